//! The CUDA backend: kernels from `kernels/` compiled at run time by NVRTC, launched through
//! the driver API; both libraries are loaded dynamically, so a machine without them runs on
//! the CPU.

pub mod cache;
mod device;
pub mod nvrtc;
pub mod sources;

pub use device::{CudaDevice, CudaOpenError};

/// Whether the NVIDIA driver library (libcuda.so) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its known names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}
