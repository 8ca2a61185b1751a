//! The CPU as a [`Device`]: buffers in host memory, ops run by the CPU kernels, work done at
//! once (every stream is always idle). Weights are not copied: "uploading" keeps a view of
//! the mmapped bytes. It is the reference every other device is compared with, and the
//! memory under the simulated device.

use super::{
    argmax, attend_sink, axpy, gated_pool, hadamard, hc, indexer_score, linear_range, rms_norm,
    rms_norm_unweighted, rotate_pairs, route_token, softmax_temp, swiglu, top_k,
};
use crate::backend::cpu::RouteRule;
use crate::backend::device::{
    Buf, DevWeight, Device, DeviceError, Event, Format, Op, Result, Stats, Stream, bytes_f32,
    bytes_i32, charge, lock,
};
use crate::model::formats::{fake_quant_e2m1_blocks, fake_quant_e4m3_blocks, fake_quant_i8_blocks};
use crate::model::weights::Weight;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
struct Memory {
    bufs: HashMap<u64, Vec<u8>>,
    weights: HashMap<u64, Weight>,
    in_use: u64,
}

pub struct CpuDevice {
    mem: Mutex<Memory>,
    next: AtomicU64,
    stats: Mutex<Stats>,
    capacity: u64,
}

impl Default for CpuDevice {
    fn default() -> Self {
        CpuDevice::with_capacity(u64::MAX)
    }
}

impl CpuDevice {
    pub fn new() -> CpuDevice {
        CpuDevice::default()
    }

    /// A CPU device that refuses allocations past `capacity` bytes (weights count their
    /// stored size although they are not copied).
    pub fn with_capacity(capacity: u64) -> CpuDevice {
        CpuDevice {
            mem: Mutex::new(Memory::default()),
            next: AtomicU64::new(1),
            stats: Mutex::new(Stats::default()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        lock(&self.mem)
    }

    fn count(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut lock(&self.stats));
    }
}

fn shape(op: &'static str, msg: String) -> DeviceError {
    DeviceError::Shape { op, msg }
}

/// f32 contents of buffer `b`, which must hold at least `n` values.
fn get_f32(m: &Memory, b: Buf, n: usize, op: &'static str) -> Result<Vec<f32>> {
    let v = m.bufs.get(&b.0).ok_or(DeviceError::Unknown(b.0))?;
    if v.len() < 4 * n {
        return Err(shape(
            op,
            format!("buffer {} holds {} bytes, needs {}", b.0, v.len(), 4 * n),
        ));
    }
    Ok(bytes_f32(&v[..4 * n]))
}

/// `n` f32 values of buffer `b` from value `off` on.
fn get_f32_at(m: &Memory, b: Buf, off: usize, n: usize, op: &'static str) -> Result<Vec<f32>> {
    let mut v = get_f32(m, b, off + n, op)?;
    v.drain(..off);
    Ok(v)
}

/// i32 contents of buffer `b`, which must hold at least `n` values.
fn get_i32(m: &Memory, b: Buf, n: usize, op: &'static str) -> Result<Vec<i32>> {
    let v = m.bufs.get(&b.0).ok_or(DeviceError::Unknown(b.0))?;
    if v.len() < 4 * n {
        return Err(shape(
            op,
            format!("buffer {} holds {} bytes, needs {}", b.0, v.len(), 4 * n),
        ));
    }
    Ok(bytes_i32(&v[..4 * n]))
}

fn put_f32(m: &mut Memory, b: Buf, vals: &[f32], op: &'static str) -> Result<()> {
    let v = m.bufs.get_mut(&b.0).ok_or(DeviceError::Unknown(b.0))?;
    let bytes = crate::backend::device::f32_bytes(vals);
    if v.len() < bytes.len() {
        return Err(shape(op, format!("output buffer {} too small", b.0)));
    }
    v[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

fn put_i32(m: &mut Memory, b: Buf, vals: &[i32], op: &'static str) -> Result<()> {
    let v = m.bufs.get_mut(&b.0).ok_or(DeviceError::Unknown(b.0))?;
    if v.len() < 4 * vals.len() {
        return Err(shape(op, format!("output buffer {} too small", b.0)));
    }
    for (c, x) in v.chunks_exact_mut(4).zip(vals) {
        c.copy_from_slice(&x.to_le_bytes());
    }
    Ok(())
}

/// Run one op on host memory (shared by the CPU and simulated devices).
fn run_op(m: &mut Memory, op: &Op) -> Result<()> {
    match op {
        Op::Linear { w, rows, x, y, t } => {
            let wt = m
                .weights
                .get(&w.id)
                .ok_or(DeviceError::Unknown(w.id))?
                .clone();
            let xs = get_f32(m, *x, t * wt.cols(), "linear")?;
            let mut ys = vec![0f32; t * rows.len()];
            linear_range(super::Kernels::Any, &wt, rows.clone(), &xs, *t, &mut ys);
            put_f32(m, *y, &ys, "linear")
        }
        Op::RmsNorm {
            x,
            w,
            y,
            rows,
            n,
            eps,
        } => {
            let mut xs = get_f32(m, *x, rows * n, "rms_norm")?;
            let ws = w.map(|w| get_f32(m, w, *n, "rms_norm")).transpose()?;
            for row in xs.chunks_mut(*n) {
                match &ws {
                    Some(ws) => rms_norm(row, ws, *eps),
                    None => rms_norm_unweighted(row, *eps),
                }
            }
            put_f32(m, *y, &xs, "rms_norm")
        }
        Op::Swiglu {
            g,
            u,
            row_w,
            row_w_off,
            out,
            n,
            width,
            limit,
        } => {
            let gs = get_f32(m, *g, *n, "swiglu")?;
            let us = get_f32(m, *u, *n, "swiglu")?;
            let rw = row_w
                .map(|b| get_f32_at(m, b, *row_w_off, n.div_ceil(*width), "swiglu"))
                .transpose()?;
            let o: Vec<f32> = (0..*n)
                .map(|i| {
                    let a = swiglu(gs[i], us[i], *limit, f32::NEG_INFINITY);
                    rw.as_ref().map_or(a, |r| a * r[i / width])
                })
                .collect();
            put_f32(m, *out, &o, "swiglu")
        }
        Op::Axpy { y, x, a, n } => {
            let xs = get_f32(m, *x, *n, "axpy")?;
            let mut ys = get_f32(m, *y, *n, "axpy")?;
            axpy(&mut ys, *a, &xs);
            put_f32(m, *y, &ys, "axpy")
        }
        Op::CopyRows {
            src,
            src_off,
            src_stride,
            dst,
            dst_off,
            dst_stride,
            rows,
            width,
        } => {
            if *rows == 0 {
                return Ok(());
            }
            let s_end = src_off + (rows - 1) * src_stride + width;
            let d_end = dst_off + (rows - 1) * dst_stride + width;
            let sv = get_f32(m, *src, s_end, "copy_rows")?;
            let mut dv = get_f32(m, *dst, d_end, "copy_rows")?;
            for r in 0..*rows {
                let (a, b) = (src_off + r * src_stride, dst_off + r * dst_stride);
                dv[b..b + width].copy_from_slice(&sv[a..a + width]);
            }
            put_f32(m, *dst, &dv, "copy_rows")
        }
        Op::GatherRows {
            x,
            idx,
            out,
            n,
            width,
        } => {
            let ids = get_i32(m, *idx, *n, "gather_rows")?;
            let rows = ids
                .iter()
                .map(|&i| i.max(0) as usize + 1)
                .max()
                .unwrap_or(0);
            let xs = get_f32(m, *x, rows * width, "gather_rows")?;
            let o: Vec<f32> = ids
                .iter()
                .flat_map(|&i| {
                    xs[i as usize * width..(i as usize + 1) * width]
                        .iter()
                        .copied()
                })
                .collect();
            put_f32(m, *out, &o, "gather_rows")
        }
        Op::AddRows {
            y,
            x,
            x_off,
            idx,
            weights,
            w_off,
            n,
            width,
        } => {
            let ids = match idx {
                Some(b) => get_i32(m, *b, *n, "add_rows")?
                    .into_iter()
                    .map(|i| i.max(0) as usize)
                    .collect(),
                None => (0..*n).collect::<Vec<usize>>(),
            };
            let f = weights
                .map(|b| get_f32_at(m, b, *w_off, *n, "add_rows"))
                .transpose()?;
            let xs = get_f32_at(m, *x, *x_off, n * width, "add_rows")?;
            let rows = ids.iter().map(|&i| i + 1).max().unwrap_or(0);
            let mut ys = get_f32(m, *y, rows * width, "add_rows")?;
            for (j, &r) in ids.iter().enumerate() {
                let a = f.as_ref().map_or(1.0, |f| f[j]);
                axpy(
                    &mut ys[r * width..(r + 1) * width],
                    a,
                    &xs[j * width..(j + 1) * width],
                );
            }
            put_f32(m, *y, &ys, "add_rows")
        }
        Op::Rope {
            x,
            inv_freq,
            rows,
            width,
            rope_dim,
            pos,
            rows_per_pos,
            inverse,
        } => {
            let f = get_f32(m, *inv_freq, rope_dim / 2, "rope")?;
            let mut xs = get_f32(m, *x, rows * width, "rope")?;
            let per = (*rows_per_pos).max(1);
            for (r, row) in xs.chunks_mut(*width).enumerate() {
                let p = pos + r / per;
                rotate_pairs(&mut row[width - rope_dim..], &f, p, *inverse, 1.0, false);
            }
            put_f32(m, *x, &xs, "rope")
        }
        Op::AttendSink {
            q,
            keys,
            idx,
            n_keys,
            max_keys,
            sink,
            scale,
            out,
            t,
            heads,
            hd,
        } => {
            let qs = get_f32(m, *q, t * heads * hd, "attend_sink")?;
            let sk = get_f32(m, *sink, *heads, "attend_sink")?;
            let ix = get_i32(m, *idx, t * max_keys, "attend_sink")?;
            let nk = get_i32(m, *n_keys, *t, "attend_sink")?;
            let kb = m.bufs.get(&keys.0).ok_or(DeviceError::Unknown(keys.0))?;
            let ks = bytes_f32(kb);
            let n_rows = ks.len() / hd;
            let mut o = vec![0f32; t * heads * hd];
            let mut logits = Vec::new();
            for j in 0..*t {
                let n = nk[j].clamp(0, *max_keys as i32) as usize;
                let rows: Vec<&[f32]> = ix[j * max_keys..j * max_keys + n]
                    .iter()
                    .map(|&r| {
                        let r = r as usize;
                        if r >= n_rows {
                            return Err(shape("attend_sink", format!("key row {r} past {n_rows}")));
                        }
                        Ok(&ks[r * hd..(r + 1) * hd])
                    })
                    .collect::<Result<_>>()?;
                for (h, &sink_h) in sk.iter().enumerate() {
                    let at = (j * heads + h) * hd;
                    attend_sink(
                        &qs[at..at + hd],
                        &rows,
                        sink_h,
                        *scale,
                        &mut logits,
                        &mut o[at..at + hd],
                    );
                }
            }
            put_f32(m, *out, &o, "attend_sink")
        }
        Op::HcMix {
            x,
            fn_,
            base,
            scale,
            out,
            t,
            hc,
            d,
            iters,
            norm_eps,
            hc_eps,
        } => {
            let mix = 2 * hc + hc * hc;
            let xs = get_f32(m, *x, t * hc * d, "hc_mix")?;
            let f = get_f32(m, *fn_, mix * hc * d, "hc_mix")?;
            let b = get_f32(m, *base, mix, "hc_mix")?;
            let mut o = Vec::with_capacity(t * mix);
            for xt in xs.chunks(hc * d) {
                o.extend(hc::coefficients(
                    &f, &b, scale, xt, *hc, *iters, *norm_eps, *hc_eps,
                ));
            }
            put_f32(m, *out, &o, "hc_mix")
        }
        Op::HcHead {
            x,
            fn_,
            base,
            scale,
            out,
            t,
            hc,
            d,
            norm_eps,
            hc_eps,
        } => {
            let xs = get_f32(m, *x, t * hc * d, "hc_head")?;
            let f = get_f32(m, *fn_, hc * hc * d, "hc_head")?;
            let b = get_f32(m, *base, *hc, "hc_head")?;
            let mut o = Vec::with_capacity(t * hc);
            for xt in xs.chunks(hc * d) {
                o.extend(hc::head_weights(
                    &f,
                    &b,
                    *scale,
                    xt,
                    (*norm_eps, *hc_eps),
                    1.0,
                ));
            }
            put_f32(m, *out, &o, "hc_head")
        }
        Op::HcCollapse {
            x,
            coef,
            stride,
            u,
            t,
            hc,
            d,
        } => {
            let xs = get_f32(m, *x, t * hc * d, "hc_collapse")?;
            let c = get_f32(m, *coef, t * stride, "hc_collapse")?;
            let mut o = Vec::with_capacity(t * d);
            for (j, xt) in xs.chunks(hc * d).enumerate() {
                o.extend(hc::collapse(&c[j * stride..j * stride + hc], xt, *d, 1.0));
            }
            put_f32(m, *u, &o, "hc_collapse")
        }
        Op::HcExpand {
            x,
            f,
            coef,
            t,
            hc,
            d,
        } => {
            let mix = 2 * hc + hc * hc;
            let mut xs = get_f32(m, *x, t * hc * d, "hc_expand")?;
            let fs = get_f32(m, *f, t * d, "hc_expand")?;
            let c = get_f32(m, *coef, t * mix, "hc_expand")?;
            for (j, xt) in xs.chunks_mut(hc * d).enumerate() {
                let cj = &c[j * mix..(j + 1) * mix];
                hc::expand(
                    &cj[*hc..2 * hc],
                    &cj[2 * hc..],
                    &fs[j * d..(j + 1) * d],
                    xt,
                    *d,
                    false,
                );
            }
            put_f32(m, *x, &xs, "hc_expand")
        }
        Op::IndexerScores {
            q,
            w,
            keys,
            out,
            n,
            ih,
            ihd,
        } => {
            let qs = get_f32(m, *q, ih * ihd, "indexer_scores")?;
            let ws = get_f32(m, *w, *ih, "indexer_scores")?;
            let ks = get_f32(m, *keys, n * ihd, "indexer_scores")?;
            let o: Vec<f32> = ks
                .chunks(*ihd)
                .map(|k| indexer_score(&qs, &ws, k, *ihd, false))
                .collect();
            put_f32(m, *out, &o, "indexer_scores")
        }
        Op::CompressPool {
            kv,
            gate,
            prev_kv,
            prev_gate,
            out,
            windows,
            r,
            d,
            cd,
            off,
        } => {
            let n = windows * r;
            let (kvs, gs) = (
                get_f32(m, *kv, n * cd, "compress_pool")?,
                get_f32(m, *gate, n * cd, "compress_pool")?,
            );
            let prev = match (prev_kv, prev_gate) {
                (Some(a), Some(b)) => Some((
                    get_f32(m, *a, n * d, "compress_pool")?,
                    get_f32(m, *b, n * d, "compress_pool")?,
                )),
                _ => None,
            };
            let mut o = vec![0f32; windows * d];
            for w in 0..*windows {
                let cur = (
                    &kvs[w * r * cd..(w + 1) * r * cd],
                    &gs[w * r * cd..(w + 1) * r * cd],
                );
                let p = prev.as_ref().map(|(a, b)| {
                    (
                        &a[w * r * d..(w + 1) * r * d],
                        &b[w * r * d..(w + 1) * r * d],
                    )
                });
                gated_pool(p, 0, cur, *r, *d, *cd, *off, &mut o[w * d..(w + 1) * d]);
            }
            put_f32(m, *out, &o, "compress_pool")
        }
        Op::QuantE4m3 {
            x,
            rows,
            width,
            len,
            block,
        }
        | Op::QuantI8 {
            x,
            rows,
            width,
            len,
            block,
        } => {
            let (name, round): (_, fn(&mut [f32], usize)) = match op {
                Op::QuantI8 { .. } => ("quant_i8", fake_quant_i8_blocks),
                _ => ("quant_e4m3", fake_quant_e4m3_blocks),
            };
            let mut xs = get_f32(m, *x, rows * width, name)?;
            for row in xs.chunks_mut(*width) {
                round(&mut row[..*len], *block);
            }
            put_f32(m, *x, &xs, name)
        }
        Op::HadamardE2m1 { x, rows, n } => {
            let mut xs = get_f32(m, *x, rows * n, "hadamard_e2m1")?;
            for row in xs.chunks_mut(*n) {
                hadamard(row);
                fake_quant_e2m1_blocks(row, 32);
            }
            put_f32(m, *x, &xs, "hadamard_e2m1")
        }
        Op::TopkSelect { scores, n, k, out } => {
            let s = get_f32(m, *scores, *n, "topk_select")?;
            let mut idx = top_k(&s, *k);
            idx.sort_unstable();
            let v: Vec<i32> = idx.into_iter().map(|i| i as i32).collect();
            put_i32(m, *out, &v, "topk_select")
        }
        Op::RouteTopk {
            logits,
            bias,
            hashed,
            tokens,
            n_experts,
            k,
            scale,
            experts,
            weights,
        } => {
            let l = get_f32(m, *logits, tokens * n_experts, "route_topk")?;
            let b = bias
                .map(|b| get_f32(m, b, *n_experts, "route_topk"))
                .transpose()?;
            let h = match hashed {
                Some(hb) => {
                    let v = m.bufs.get(&hb.0).ok_or(DeviceError::Unknown(hb.0))?;
                    Some(bytes_i32(v))
                }
                None => None,
            };
            let rule = RouteRule {
                k: *k,
                scale: *scale,
                bias_in_weights: false,
                normalize: true,
            };
            let (mut ex, mut wt) = (Vec::new(), Vec::new());
            for ti in 0..*tokens {
                let hh = h.as_ref().map(|h| {
                    h[ti * k..(ti + 1) * k]
                        .iter()
                        .map(|&e| e as usize)
                        .collect()
                });
                let (e, w) = route_token(
                    &l[ti * n_experts..(ti + 1) * n_experts],
                    b.as_deref(),
                    hh,
                    rule,
                );
                ex.extend(e.iter().map(|&e| e as i32));
                wt.extend(w);
            }
            put_i32(m, *experts, &ex, "route_topk")?;
            put_f32(m, *weights, &wt, "route_topk")
        }
        Op::Argmax { x, rows, n, out } => {
            let xs = get_f32(m, *x, rows * n, "argmax")?;
            let idx: Vec<i32> = xs.chunks(*n).map(|r| argmax(r) as i32).collect();
            put_i32(m, *out, &idx, "argmax")
        }
        Op::SoftmaxTemp {
            x,
            rows,
            n,
            temperature,
        } => {
            let mut xs = get_f32(m, *x, rows * n, "softmax_temp")?;
            for r in xs.chunks_mut(*n) {
                softmax_temp(r, *temperature);
            }
            put_f32(m, *x, &xs, "softmax_temp")
        }
    }
}

/// The CPU device's memory, lent to the simulated device (same results, its own accounting).
pub(crate) struct HostMemory<'a>(std::sync::MutexGuard<'a, Memory>);

impl CpuDevice {
    pub(crate) fn host(&self) -> HostMemory<'_> {
        HostMemory(self.lock())
    }
}

impl HostMemory<'_> {
    pub(crate) fn run(&mut self, op: &Op) -> Result<()> {
        run_op(&mut self.0, op)
    }
}

impl Device for CpuDevice {
    fn name(&self) -> String {
        "CPU".to_string()
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn in_use(&self) -> u64 {
        self.lock().in_use
    }

    fn alloc(&self, bytes: usize) -> Result<Buf> {
        let mut m = self.lock();
        charge(&mut m.in_use, self.capacity, bytes as u64)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // Contents are unset on a real device: NaNs here, so nothing comes to rely on zeros.
        m.bufs.insert(id, vec![0xFFu8; bytes]);
        Ok(Buf(id))
    }

    fn free(&self, b: Buf) {
        let mut m = self.lock();
        if let Some(v) = m.bufs.remove(&b.0) {
            m.in_use -= v.len() as u64;
        }
    }

    fn write_at(&self, dst: Buf, offset: usize, src: &[u8], _s: Stream) -> Result<()> {
        let mut m = self.lock();
        let v = m.bufs.get_mut(&dst.0).ok_or(DeviceError::Unknown(dst.0))?;
        if v.len() < offset + src.len() {
            return Err(shape(
                "write",
                format!(
                    "{} bytes at {offset} into a buffer of {}",
                    src.len(),
                    v.len()
                ),
            ));
        }
        v[offset..offset + src.len()].copy_from_slice(src);
        self.count(|s| {
            s.bytes_to_device += src.len() as u64;
            s.transfers += 1;
        });
        Ok(())
    }

    fn read(&self, src: Buf, dst: &mut [u8], _s: Stream) -> Result<()> {
        let m = self.lock();
        let v = m.bufs.get(&src.0).ok_or(DeviceError::Unknown(src.0))?;
        if v.len() < dst.len() {
            return Err(shape(
                "read",
                format!("{} bytes from a buffer of {}", dst.len(), v.len()),
            ));
        }
        dst.copy_from_slice(&v[..dst.len()]);
        self.count(|s| {
            s.bytes_to_host += dst.len() as u64;
            s.transfers += 1;
        });
        Ok(())
    }

    fn upload_weight(&self, w: &Weight, _s: Stream) -> Result<DevWeight> {
        let bytes = w.stored_bytes() as u64;
        let mut m = self.lock();
        charge(&mut m.in_use, self.capacity, bytes)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        m.weights.insert(id, w.clone());
        Ok(DevWeight {
            id,
            format: Format::of(w),
            rows: w.rows(),
            cols: w.cols(),
            bytes,
        })
    }

    fn free_weight(&self, w: DevWeight) {
        let mut m = self.lock();
        if m.weights.remove(&w.id).is_some() {
            m.in_use -= w.bytes;
        }
    }

    fn run(&self, op: &Op, _s: Stream) -> Result<()> {
        run_op(&mut self.lock(), op)?;
        self.count(|s| s.launches += 1);
        Ok(())
    }

    fn record(&self, _s: Stream) -> Result<Event> {
        Ok(Event(0))
    }

    fn wait(&self, _s: Stream, _e: Event) -> Result<()> {
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn stats(&self) -> Stats {
        lock(&self.stats).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::{bytes_f32, bytes_i32, f32_bytes};

    fn buf(d: &CpuDevice, v: &[f32]) -> Buf {
        let b = d.alloc(4 * v.len()).expect("alloc");
        d.write(b, f32_bytes(v), Stream::COMPUTE).expect("write");
        b
    }

    fn get(d: &CpuDevice, b: Buf, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; 4 * n];
        d.read(b, &mut out, Stream::COMPUTE).expect("read");
        out
    }

    #[test]
    fn route_topk_by_hand() {
        // scores = sqrt(ln(1 + e^l)); top 2 of [0, 1, 2, 3] are experts 3 and 2.
        let d = CpuDevice::new();
        let logits = buf(&d, &[0.0, 1.0, 2.0, 3.0]);
        let (ex, wt) = (d.alloc(8).expect("alloc"), d.alloc(8).expect("alloc"));
        let op = |bias, hashed| Op::RouteTopk {
            logits,
            bias,
            hashed,
            tokens: 1,
            n_experts: 4,
            k: 2,
            scale: 1.5,
            experts: ex,
            weights: wt,
        };
        let s = |l: f64| (1.0 + l.exp()).ln().sqrt();
        d.launch(&op(None, None), Stream::COMPUTE).expect("route");
        assert_eq!(bytes_i32(&get(&d, ex, 2)), vec![3, 2]);
        let w = bytes_f32(&get(&d, wt, 2));
        let sum = s(3.0) + s(2.0);
        assert!((w[0] as f64 - 1.5 * s(3.0) / sum).abs() < 1e-6);
        assert!((w[1] as f64 - 1.5 * s(2.0) / sum).abs() < 1e-6);
        // A bias that favours expert 0 chooses it, but the weight uses the unbiased score.
        let bias = buf(&d, &[10.0, 0.0, 0.0, 0.0]);
        d.launch(&op(Some(bias), None), Stream::COMPUTE)
            .expect("route");
        assert_eq!(bytes_i32(&get(&d, ex, 2)), vec![0, 3]);
        let w = bytes_f32(&get(&d, wt, 2));
        assert!((w[0] as f64 - 1.5 * s(0.0) / (s(0.0) + s(3.0))).abs() < 1e-6);
        // Hash routing: the given experts, in the given order.
        let h = d.alloc(8).expect("alloc");
        let hb: Vec<u8> = [1i32, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        d.write(h, &hb, Stream::COMPUTE).expect("write");
        d.launch(&op(None, Some(h)), Stream::COMPUTE)
            .expect("route");
        assert_eq!(bytes_i32(&get(&d, ex, 2)), vec![1, 2]);
    }

    #[test]
    fn small_ops_by_hand() {
        let d = CpuDevice::new();
        // argmax: first of the tied maxima.
        let x = buf(&d, &[1.0, 5.0, 5.0, 2.0]);
        let out = d.alloc(4).expect("alloc");
        d.launch(
            &Op::Argmax {
                x,
                rows: 1,
                n: 4,
                out,
            },
            Stream::COMPUTE,
        )
        .expect("argmax");
        assert_eq!(bytes_i32(&get(&d, out, 1)), vec![1]);
        // softmax([0, ln 3]) = [1/4, 3/4]; at temperature 2: [1/(1+√3), √3/(1+√3)].
        let x = buf(&d, &[0.0, 3f32.ln(), 0.0, 3f32.ln()]);
        let op = Op::SoftmaxTemp {
            x,
            rows: 1,
            n: 2,
            temperature: 1.0,
        };
        d.launch(&op, Stream::COMPUTE).expect("softmax");
        let p = bytes_f32(&get(&d, x, 2));
        assert!(
            (p[0] - 0.25).abs() < 1e-6 && (p[1] - 0.75).abs() < 1e-6,
            "{p:?}"
        );
        // RoPE by a quarter turn: the trailing pair (1, 0) becomes (0, 1); the rest stays.
        let x = buf(&d, &[7.0, 8.0, 1.0, 0.0]);
        let f = buf(&d, &[std::f32::consts::FRAC_PI_2]);
        let op = Op::Rope {
            x,
            inv_freq: f,
            rows: 1,
            width: 4,
            rope_dim: 2,
            pos: 1,
            rows_per_pos: 1,
            inverse: false,
        };
        d.launch(&op, Stream::COMPUTE).expect("rope");
        let r = bytes_f32(&get(&d, x, 4));
        assert_eq!(&r[..2], &[7.0, 8.0]);
        assert!(r[2].abs() < 1e-7 && (r[3] - 1.0).abs() < 1e-7, "{r:?}");
        // SwiGLU with a per-row weight: silu(min(20, 10)) * clamp(-30) * 0.5 = silu(10) * -5.
        let (g, u, rw) = (buf(&d, &[20.0]), buf(&d, &[-30.0]), buf(&d, &[0.5]));
        let out = d.alloc(4).expect("alloc");
        let op = Op::Swiglu {
            g,
            u,
            row_w: Some(rw),
            row_w_off: 0,
            out,
            n: 1,
            width: 1,
            limit: 10.0,
        };
        d.launch(&op, Stream::COMPUTE).expect("swiglu");
        let want = 10.0 / (1.0 + (-10f32).exp()) * -5.0;
        assert!((bytes_f32(&get(&d, out, 1))[0] - want).abs() < 1e-5);
        // Unknown buffers are an error, not a panic.
        let bad = Op::Axpy {
            y: Buf(999),
            x: Buf(998),
            a: 1.0,
            n: 1,
        };
        assert!(matches!(
            d.launch(&bad, Stream::COMPUTE),
            Err(DeviceError::Unknown(_))
        ));
    }

    #[test]
    fn attention_rope_positions_and_topk_by_hand() {
        let d = CpuDevice::new();
        // One key with q·k = 0 and a sink of 0: weights e^0 / (e^0 + e^0) = 1/2 on the key.
        let q = buf(&d, &[1.0, 0.0]);
        let keys = buf(&d, &[9.0, 9.0, 0.0, 4.0]); // row 1 = [0, 4]
        let sink = buf(&d, &[0.0]);
        let idx = d.alloc(4).expect("alloc");
        d.write(idx, &1i32.to_le_bytes(), Stream::COMPUTE)
            .expect("write");
        let nk = d.alloc(4).expect("alloc");
        d.write(nk, &1i32.to_le_bytes(), Stream::COMPUTE)
            .expect("write");
        let out = d.alloc(8).expect("alloc");
        let op = Op::AttendSink {
            q,
            keys,
            idx,
            n_keys: nk,
            max_keys: 1,
            sink,
            scale: 1.0,
            out,
            t: 1,
            heads: 1,
            hd: 2,
        };
        // A head dim of 2 is outside the op's contract (CUDA's kernel takes multiples of 32):
        // `launch` refuses it on every device; the CPU kernel itself computes it.
        assert!(matches!(
            d.launch(&op, Stream::COMPUTE),
            Err(DeviceError::Shape {
                op: "attend_sink",
                ..
            })
        ));
        d.run(&op, Stream::COMPUTE).expect("attend");
        assert_eq!(bytes_f32(&get(&d, out, 2)), vec![0.0, 2.0]);
        // RoPE: the second row sits one position later (rows_per_pos 1): a half turn.
        let x = buf(&d, &[1.0, 0.0, 1.0, 0.0]);
        let f = buf(&d, &[std::f32::consts::FRAC_PI_2]);
        let op = Op::Rope {
            x,
            inv_freq: f,
            rows: 2,
            width: 2,
            rope_dim: 2,
            pos: 1,
            rows_per_pos: 1,
            inverse: false,
        };
        d.launch(&op, Stream::COMPUTE).expect("rope");
        let r = bytes_f32(&get(&d, x, 4));
        assert!(r[0].abs() < 1e-6 && (r[1] - 1.0).abs() < 1e-6, "{r:?}");
        assert!((r[2] + 1.0).abs() < 1e-6 && r[3].abs() < 1e-6, "{r:?}");
        // Top 3 of [1, 5, 3, 5, 5] with ties to the lower index, ascending: {1, 3, 4}.
        let s = buf(&d, &[1.0, 5.0, 3.0, 5.0, 5.0]);
        let o = d.alloc(12).expect("alloc");
        d.launch(
            &Op::TopkSelect {
                scores: s,
                n: 5,
                k: 3,
                out: o,
            },
            Stream::COMPUTE,
        )
        .expect("topk");
        assert_eq!(bytes_i32(&get(&d, o, 3)), vec![1, 3, 4]);
    }

    #[test]
    fn row_copies_gathers_and_adds_by_hand() {
        let d = CpuDevice::new();
        let i32_buf = |v: &[i32]| {
            let b = d.alloc(4 * v.len()).expect("alloc");
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            d.write(b, &bytes, Stream::COMPUTE).expect("write");
            b
        };
        // Group 1 (columns 2..4) of a [2, 2 groups x 2] activation into a [2, 2] buffer, then
        // into columns 1..3 of rows 0 and 1 of a [2, 4] one.
        let src = buf(&d, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let mid = buf(&d, &[0.0; 4]);
        let dst = buf(&d, &[-1.0; 8]);
        let copy = |src, src_off, dst, dst_off, dst_stride| Op::CopyRows {
            src,
            src_off,
            src_stride: 4,
            dst,
            dst_off,
            dst_stride,
            rows: 2,
            width: 2,
        };
        d.launch(&copy(src, 2, mid, 0, 2), Stream::COMPUTE)
            .expect("copy");
        assert_eq!(bytes_f32(&get(&d, mid, 4)), vec![3.0, 4.0, 7.0, 8.0]);
        d.launch(&copy(src, 2, dst, 1, 4), Stream::COMPUTE)
            .expect("copy");
        assert_eq!(
            bytes_f32(&get(&d, dst, 8)),
            vec![-1.0, 3.0, 4.0, -1.0, -1.0, 7.0, 8.0, -1.0]
        );
        // Rows 1, 0, 1 of a [2, 2] buffer.
        let x = buf(&d, &[1.0, 2.0, 3.0, 4.0]);
        let out = buf(&d, &[0.0; 6]);
        let idx = i32_buf(&[1, 0, 1]);
        let gather = Op::GatherRows {
            x,
            idx,
            out,
            n: 3,
            width: 2,
        };
        d.launch(&gather, Stream::COMPUTE).expect("gather");
        assert_eq!(
            bytes_f32(&get(&d, out, 6)),
            vec![3.0, 4.0, 1.0, 2.0, 3.0, 4.0]
        );
        // y[1] += 0.5 [10, 20]; y[0] += 2 [30, 40]; y[1] += 4 [50, 60] (rows from x_off 2,
        // weights from w_off 1); then without idx or weights, y[j] += x[j].
        let y = buf(&d, &[1.0, 1.0, 1.0, 1.0]);
        let xs = buf(&d, &[0.0, 0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
        let w = buf(&d, &[9.0, 0.5, 2.0, 4.0]);
        let add = Op::AddRows {
            y,
            x: xs,
            x_off: 2,
            idx: Some(i32_buf(&[1, 0, 1])),
            weights: Some(w),
            w_off: 1,
            n: 3,
            width: 2,
        };
        d.launch(&add, Stream::COMPUTE).expect("add");
        assert_eq!(bytes_f32(&get(&d, y, 4)), vec![61.0, 81.0, 206.0, 251.0]);
        let plain = Op::AddRows {
            y,
            x: xs,
            x_off: 0,
            idx: None,
            weights: None,
            w_off: 0,
            n: 2,
            width: 2,
        };
        d.launch(&plain, Stream::COMPUTE).expect("add");
        assert_eq!(bytes_f32(&get(&d, y, 4)), vec![61.0, 81.0, 216.0, 271.0]);
    }
}
