// Host-side launcher for the involution kernels built through cuda_host_shim.h: runs every block and thread of a
// 1-D grid one after the other. tests/test_ops_host_emulation.py builds it as
//   g++ -std=c++17 -O2 -shared -fPIC -include cuda_host_shim.h -DINVOLUTION_SCALAR=float
//       -DINVOLUTION_KERNEL_FILE='"<repo>/ops/kernels/involution.cu"' launcher.cpp -o libinvolution_float.so
#include <cstddef>
#include <type_traits>
#include <utility>

#include INVOLUTION_KERNEL_FILE

namespace emulation {

// Calls kernel(*args[0], *args[1], ...), each args[i] pointing at a value of the i-th parameter's type, as the
// kernelParams of cuLaunchKernel do.
template <typename... Params, std::size_t... I>
void call(void (*kernel)(Params...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<Params>*>(args[I])...);
}

template <typename... Params>
void launch(void (*kernel)(Params...), unsigned int grid, unsigned int block, void** args) {
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    for (unsigned int b = 0; b < grid; ++b) {
        for (unsigned int t = 0; t < block; ++t) {
            blockIdx = uint3{b, 0, 0};
            threadIdx = uint3{t, 0, 0};
            call(kernel, args, std::index_sequence_for<Params...>{});
        }
    }
}

}  // namespace emulation

// One C entry point per kernel: emulate_<kernel>(grid, block, args).
#define EMULATE(kernel)                                                                  \
    extern "C" void emulate_##kernel(unsigned int grid, unsigned int block, void** args) { \
        emulation::launch(&kernel, grid, block, args);                                   \
    }

EMULATE(involution_forward_i32)
EMULATE(involution_forward_i64)
EMULATE(involution_grad_input_i32)
EMULATE(involution_grad_input_i64)
EMULATE(involution_grad_weight_i32)
EMULATE(involution_grad_weight_i64)
EMULATE(involution_forward_nhwc_i32)
EMULATE(involution_forward_nhwc_i64)
EMULATE(involution_grad_input_nhwc_i32)
EMULATE(involution_grad_input_nhwc_i64)
EMULATE(involution_grad_weight_nhwc_i32)
EMULATE(involution_grad_weight_nhwc_i64)
