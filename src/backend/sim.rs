//! A simulated accelerator for tests and `--device sim:<capacity>`: the CPU device's memory
//! and kernels (so results are exactly the CPU's), a capacity that allocations and resident
//! weights must fit in, and a clock per stream that models what the work would cost on a
//! real card: copies take latency + bytes / link bandwidth, kernels the larger of bytes read
//! / memory bandwidth and flops / peak. Events carry a stream's time to the streams that
//! wait on them, so overlap of copies with compute shows in the modelled time.

use crate::backend::cpu::CpuDevice;
use crate::backend::device::{
    Buf, DevWeight, Device, DeviceError, Event, Op, Result, Stats, Stream,
};
use crate::model::weights::Weight;
use std::collections::HashMap;
use std::sync::Mutex;

/// What the simulated card is like. Defaults: a PCIe 4.0 x16 link and an RTX 4090-class
/// card (1 TB/s, 80 TFLOP/s fp32-equivalent for the dequantizing kernels).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimCost {
    pub host_to_device_gbs: f64,
    pub device_to_host_gbs: f64,
    /// Per copy and per launch.
    pub latency_s: f64,
    pub memory_gbs: f64,
    pub tflops: f64,
}

impl Default for SimCost {
    fn default() -> Self {
        SimCost {
            host_to_device_gbs: 25.0,
            device_to_host_gbs: 25.0,
            latency_s: 10e-6,
            memory_gbs: 1000.0,
            tflops: 80.0,
        }
    }
}

#[derive(Default)]
struct Clocks {
    stream: HashMap<u32, f64>,
    events: Vec<f64>,
    stats: Stats,
}

pub struct SimDevice {
    mem: CpuDevice,
    cost: SimCost,
    clocks: Mutex<Clocks>,
}

impl SimDevice {
    pub fn new(capacity: u64, cost: SimCost) -> SimDevice {
        SimDevice {
            mem: CpuDevice::with_capacity(capacity),
            cost,
            clocks: Mutex::new(Clocks::default()),
        }
    }

    fn clocks(&self) -> std::sync::MutexGuard<'_, Clocks> {
        crate::backend::device::lock(&self.clocks)
    }

    /// Advance stream `s` by `dt`; returns the new time.
    fn advance(&self, s: Stream, dt: f64, copy: bool) -> f64 {
        let mut c = self.clocks();
        let t = c.stream.entry(s.0).or_insert(0.0);
        *t += dt;
        let now = *t;
        if copy {
            c.stats.copy_s += dt;
        } else {
            c.stats.kernel_s += dt;
        }
        now
    }

    /// Modelled time of stream `s` so far.
    pub fn stream_time(&self, s: Stream) -> f64 {
        self.clocks().stream.get(&s.0).copied().unwrap_or(0.0)
    }

    /// Modelled wall time: the latest stream.
    pub fn elapsed(&self) -> f64 {
        self.clocks()
            .stream
            .values()
            .fold(0.0, |a: f64, &b| a.max(b))
    }

    /// Modelled seconds of an op: its bytes over the memory bandwidth or its flops over
    /// the peak, whichever is longer, plus the launch latency.
    fn op_time(&self, op: &Op) -> f64 {
        let (c, (bytes, flops)) = (&self.cost, op.cost());
        c.latency_s + (bytes / (c.memory_gbs * 1e9)).max(flops / (c.tflops * 1e12))
    }
}

/// Parse a byte size as users write it: "24G", "512M", "1.5T", "24GiB", "24GB" (binary
/// units: G = 2^30), or a plain number of bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1u64 << 10),
        Some('m') => (&body[..body.len() - 1], 1 << 20),
        Some('g') => (&body[..body.len() - 1], 1 << 30),
        Some('t') => (&body[..body.len() - 1], 1 << 40),
        _ => (body, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (expected e.g. 24G, 512M, 1.5T)"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!(
            "'{s}' is not a size (expected e.g. 24G, 512M, 1.5T)"
        ));
    }
    Ok((v * mult as f64).round() as u64)
}

impl Device for SimDevice {
    fn name(&self) -> String {
        format!(
            "simulated device ({:.1} GiB, {:.0} GB/s link)",
            self.capacity() as f64 / (1u64 << 30) as f64,
            self.cost.host_to_device_gbs
        )
    }

    fn capacity(&self) -> u64 {
        self.mem.capacity()
    }

    fn in_use(&self) -> u64 {
        self.mem.in_use()
    }

    fn alloc(&self, bytes: usize) -> Result<Buf> {
        self.mem.alloc(bytes)
    }

    fn free(&self, b: Buf) {
        self.mem.free(b)
    }

    fn write_at(&self, dst: Buf, offset: usize, src: &[u8], s: Stream) -> Result<()> {
        self.mem.write_at(dst, offset, src, s)?;
        let dt = self.cost.latency_s + src.len() as f64 / (self.cost.host_to_device_gbs * 1e9);
        self.advance(s, dt, true);
        let mut c = self.clocks();
        c.stats.bytes_to_device += src.len() as u64;
        c.stats.transfers += 1;
        Ok(())
    }

    fn read(&self, src: Buf, dst: &mut [u8], s: Stream) -> Result<()> {
        self.mem.read(src, dst, s)?;
        let dt = self.cost.latency_s + dst.len() as f64 / (self.cost.device_to_host_gbs * 1e9);
        self.advance(s, dt, true);
        let mut c = self.clocks();
        c.stats.bytes_to_host += dst.len() as u64;
        c.stats.transfers += 1;
        Ok(())
    }

    fn upload_weight(&self, w: &Weight, s: Stream) -> Result<DevWeight> {
        let dw = self.mem.upload_weight(w, s)?;
        let dt = self.cost.latency_s + dw.bytes as f64 / (self.cost.host_to_device_gbs * 1e9);
        self.advance(s, dt, true);
        let mut c = self.clocks();
        c.stats.bytes_to_device += dw.bytes;
        c.stats.transfers += 1;
        Ok(dw)
    }

    fn free_weight(&self, w: DevWeight) {
        self.mem.free_weight(w)
    }

    fn run(&self, op: &Op, s: Stream) -> Result<()> {
        self.mem.host().run(op)?;
        self.advance(s, self.op_time(op), false);
        self.clocks().stats.launches += 1;
        Ok(())
    }

    fn record(&self, s: Stream) -> Result<Event> {
        let mut c = self.clocks();
        let t = c.stream.get(&s.0).copied().unwrap_or(0.0);
        c.events.push(t);
        Ok(Event(c.events.len() as u64 - 1))
    }

    fn wait(&self, s: Stream, e: Event) -> Result<()> {
        let mut c = self.clocks();
        let te = *c
            .events
            .get(e.0 as usize)
            .ok_or(DeviceError::Unknown(e.0))?;
        let t = c.stream.entry(s.0).or_insert(0.0);
        *t = t.max(te);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        let mut c = self.clocks();
        let end = c.stream.values().fold(0.0, |a: f64, &b| a.max(b));
        for t in c.stream.values_mut() {
            *t = end;
        }
        Ok(())
    }

    fn stats(&self) -> Stats {
        self.clocks().stats.clone()
    }

    fn memory_gbs(&self) -> Option<f64> {
        Some(self.cost.memory_gbs)
    }

    fn link_gbs(&self) -> Option<f64> {
        Some(self.cost.host_to_device_gbs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::{bytes_f32, f32_bytes};
    use crate::model::checkpoint::Bytes;

    fn cost() -> SimCost {
        SimCost {
            host_to_device_gbs: 10.0,
            device_to_host_gbs: 5.0,
            latency_s: 1e-5,
            memory_gbs: 100.0,
            tflops: 1.0,
        }
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("24G"), Ok(24 << 30));
        assert_eq!(parse_size("24GiB"), Ok(24 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(
            parse_size("lots")
                .unwrap_err()
                .contains("'lots' is not a size")
        );
        assert!(parse_size("-1G").is_err());
    }

    #[test]
    fn capacity_is_enforced_and_returned() {
        let d = SimDevice::new(1000, cost());
        let a = d.alloc(600).expect("fits");
        match d.alloc(500) {
            Err(DeviceError::OutOfMemory {
                requested: 500,
                free: 400,
                capacity: 1000,
            }) => {}
            other => panic!("expected out of memory, got {other:?}"),
        }
        d.free(a);
        assert_eq!(d.in_use(), 0);
        let w = Weight::Bf16 {
            rows: 10,
            cols: 40,
            data: Bytes::from_vec(vec![0u8; 800]),
        };
        let dw = d.upload_weight(&w, Stream::COPY).expect("800 B fit");
        assert_eq!((d.in_use(), dw.bytes), (800, 800));
        assert!(
            d.upload_weight(&w, Stream::COPY).is_err(),
            "second copy does not fit"
        );
        d.free_weight(dw);
        assert_eq!(d.in_use(), 0);
    }

    #[test]
    fn copy_time_is_latency_plus_bytes_over_bandwidth() {
        let d = SimDevice::new(1 << 30, cost());
        let b = d.alloc(100_000_000).expect("fits");
        d.write(b, &vec![0u8; 100_000_000], Stream::COPY)
            .expect("write");
        // 1e8 B at 10 GB/s = 10 ms, plus 10 us.
        assert!((d.stream_time(Stream::COPY) - 0.01001).abs() < 1e-12);
        let mut back = vec![0u8; 50_000_000];
        d.read(b, &mut back, Stream::COMPUTE).expect("read");
        // 5e7 B at 5 GB/s = 10 ms, plus 10 us, on the other stream.
        assert!((d.stream_time(Stream::COMPUTE) - 0.01001).abs() < 1e-12);
        let s = d.stats();
        assert_eq!(
            (s.bytes_to_device, s.bytes_to_host, s.transfers),
            (100_000_000, 50_000_000, 2)
        );
    }

    #[test]
    fn events_order_streams_and_overlap_shows() {
        let d = SimDevice::new(1 << 30, cost());
        let b = d.alloc(10_000_000).expect("fits");
        // A 1 ms copy on the copy stream, overlapped with 1 ms of compute work.
        d.write(b, &vec![0u8; 9_900_000], Stream::COPY)
            .expect("write"); // 0.99 ms + 10 us
        let x = d.alloc(4 * 1_000_000).expect("fits");
        let op = Op::Axpy {
            y: x,
            x,
            a: 1.0,
            n: 1_000_000,
        };
        // 12 MB at 100 GB/s = 0.12 ms per launch (+10 us).
        for _ in 0..7 {
            d.launch(&op, Stream::COMPUTE).expect("axpy");
        }
        let compute = d.stream_time(Stream::COMPUTE);
        assert!((compute - 7.0 * 0.00013).abs() < 1e-12);
        assert!(
            (d.elapsed() - 0.001).abs() < 1e-12,
            "overlapped: {}",
            d.elapsed()
        );
        // The compute stream now needs the copied buffer: it waits for the copy's event.
        let e = d.record(Stream::COPY).expect("record");
        d.wait(Stream::COMPUTE, e).expect("wait");
        assert!((d.stream_time(Stream::COMPUTE) - 0.001).abs() < 1e-12);
    }

    #[test]
    fn results_are_the_cpu_kernels() {
        let d = SimDevice::new(1 << 20, cost());
        let x = d.alloc(16).expect("fits");
        d.write(x, f32_bytes(&[3.0, 4.0, 0.0, 0.0]), Stream::COMPUTE)
            .expect("write");
        let op = Op::RmsNorm {
            x,
            w: None,
            y: x,
            rows: 2,
            n: 2,
            eps: 0.0,
        };
        d.launch(&op, Stream::COMPUTE).expect("launch");
        let mut out = [0u8; 8];
        d.read(x, &mut out, Stream::COMPUTE).expect("read");
        let r = 12.5f32.sqrt();
        assert_eq!(bytes_f32(&out), vec![3.0 / r, 4.0 / r]);
    }
}
