//! Run-time compilation of the embedded kernels to CUBIN with NVRTC (loaded dynamically:
//! `libnvrtc.so` from a CUDA install, the driver package, or the PyPI wheel
//! `nvidia-cuda-nvrtc-cu12`). Needs no GPU: CI compiles every unit for every target arch.

use super::sources::{HEADERS, Source};
use cudarc::nvrtc::sys;
use std::ffi::{CStr, CString, c_char, c_int};

/// The architectures the kernels are written for (Ampere, Ada, Hopper, Blackwell consumer).
pub const TARGET_ARCHS: &[u32] = &[80, 89, 90, 120];

/// Resource use of one compiled kernel, from ptxas' verbose report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    pub name: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
    pub kernels: Vec<KernelInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    #[error("NVRTC (libnvrtc.so) was not found on the library path")]
    NotFound,
    #[error("kernels/{file} does not compile for sm_{arch}: {log}")]
    Compile {
        file: &'static str,
        arch: u32,
        log: String,
    },
    #[error("NVRTC {call} failed for kernels/{file}: {code:?}")]
    Api {
        call: &'static str,
        file: &'static str,
        code: sys::nvrtcResult,
    },
}

/// Whether libnvrtc can be loaded (never panics, unlike a first call into it would).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library by its known names.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn version() -> Result<(i32, i32), NvrtcError> {
    if !available() {
        return Err(NvrtcError::NotFound);
    }
    let (mut a, mut b) = (0 as c_int, 0 as c_int);
    // SAFETY: two valid out-pointers.
    let r = unsafe { sys::nvrtcVersion(&mut a, &mut b) };
    check(r, "nvrtcVersion", "-")?;
    Ok((a, b))
}

fn check(r: sys::nvrtcResult, call: &'static str, file: &'static str) -> Result<(), NvrtcError> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(NvrtcError::Api {
            call,
            file,
            code: r,
        })
    }
}

/// A program handle destroyed on every exit path.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once.
        unsafe {
            sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn cstring(s: &str) -> CString {
    // Our sources are plain text without NUL bytes (checked by the embedding test).
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// Compile one unit of `kernels/` to CUBIN for `sm_<arch>`, with ptxas' register and spill
/// report parsed per kernel.
pub fn compile(unit: &Source, arch: u32) -> Result<Compiled, NvrtcError> {
    if !available() {
        return Err(NvrtcError::NotFound);
    }
    let file = unit.name;
    let src = cstring(unit.text);
    let name = cstring(unit.name);
    let hdr_text: Vec<CString> = HEADERS.iter().map(|h| cstring(h.text)).collect();
    let hdr_name: Vec<CString> = HEADERS.iter().map(|h| cstring(h.name)).collect();
    let hdr_text_p: Vec<*const c_char> = hdr_text.iter().map(|c| c.as_ptr()).collect();
    let hdr_name_p: Vec<*const c_char> = hdr_name.iter().map(|c| c.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all strings are NUL-terminated and outlive the call; the header arrays have
    // HEADERS.len() entries each.
    let r = unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            HEADERS.len() as c_int,
            hdr_text_p.as_ptr(),
            hdr_name_p.as_ptr(),
        )
    };
    check(r, "nvrtcCreateProgram", file)?;
    let prog = Program(prog);
    let opts: Vec<CString> = [
        format!("--gpu-architecture=sm_{arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
    ]
    .iter()
    .map(|o| cstring(o))
    .collect();
    let opt_p: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();
    // SAFETY: a live program and opts.len() valid option strings.
    let compiled =
        unsafe { sys::nvrtcCompileProgram(prog.0, opt_p.len() as c_int, opt_p.as_ptr()) };
    let log = program_log(&prog, file)?;
    if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(NvrtcError::Compile {
            file,
            arch,
            log: log.trim().to_string(),
        });
    }
    let mut size = 0usize;
    // SAFETY: a compiled program and a valid out-pointer.
    check(
        unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) },
        "nvrtcGetCUBINSize",
        file,
    )?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has the size NVRTC reported.
    check(
        unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char) },
        "nvrtcGetCUBIN",
        file,
    )?;
    let kernels = parse_ptxas_report(&log);
    Ok(Compiled {
        cubin,
        log,
        kernels,
    })
}

fn program_log(prog: &Program, file: &'static str) -> Result<String, NvrtcError> {
    let mut size = 0usize;
    // SAFETY: a live program and a valid out-pointer.
    check(
        unsafe { sys::nvrtcGetProgramLogSize(prog.0, &mut size) },
        "nvrtcGetProgramLogSize",
        file,
    )?;
    let mut buf = vec![0u8; size.max(1)];
    // SAFETY: `buf` has the size NVRTC reported (at least the NUL).
    check(
        unsafe { sys::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr() as *mut c_char) },
        "nvrtcGetProgramLog",
        file,
    )?;
    Ok(CStr::from_bytes_until_nul(&buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default())
}

/// Per-kernel registers and spills from ptxas' `-v` lines:
/// `Compiling entry function 'k' for 'sm_80'`, `N bytes stack frame, S bytes spill stores,
/// L bytes spill loads`, `Used R registers, ...`.
pub fn parse_ptxas_report(log: &str) -> Vec<KernelInfo> {
    let mut out: Vec<KernelInfo> = Vec::new();
    let num_before = |line: &str, word: &str| -> Option<u32> {
        let i = line.find(word)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelInfo {
                name,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
        } else if let Some(k) = out.last_mut() {
            if let Some(v) = num_before(line, "bytes spill stores") {
                k.spill_stores = v;
            }
            if let Some(v) = num_before(line, "bytes spill loads") {
                k.spill_loads = v;
            }
            if let Some(v) = num_before(line, "registers") {
                k.registers = v;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        // The shape of ptxas' report (CUDA 12.x), as NVRTC returns it in the program log.
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'gemv_fp4' for 'sm_80'\n\
            ptxas info    : Function properties for gemv_fp4\n\
            \x20   0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 40 registers, 392 bytes cmem[0]\n\
            ptxas info    : Compiling entry function 'gemv_fp8' for 'sm_80'\n\
            ptxas info    : Function properties for gemv_fp8\n\
            \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 30 registers, 392 bytes cmem[0]\n";
        let k = parse_ptxas_report(log);
        assert_eq!(
            k,
            vec![
                KernelInfo {
                    name: "gemv_fp4".into(),
                    registers: 40,
                    spill_stores: 8,
                    spill_loads: 12
                },
                KernelInfo {
                    name: "gemv_fp8".into(),
                    registers: 30,
                    spill_stores: 0,
                    spill_loads: 0
                },
            ]
        );
    }
}
