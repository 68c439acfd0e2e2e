// The backward half of the CPU kernels, whose code is all in instance_norm_act.cpp: compiled as a
// source of its own only so that ninja builds the two halves (each instantiates only its own passes,
// for 4 dtypes x 3 activations x 3 ISAs) on two cores at once.
#define MELANO_CPU_BACKWARD
#include "instance_norm_act.cpp"
