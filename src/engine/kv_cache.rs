//! Decode state storage (spec §6): growing row stores allocated in fixed-size blocks as the
//! sequence grows (never one max-context allocation), and the fixed sliding-window ring.

use super::snapshot::{Dec, Enc, SnapshotError};

/// Rows of one width, appended over time, stored in blocks of `block_rows` rows.
#[derive(Debug)]
pub struct RowStore {
    width: usize,
    block_rows: usize,
    blocks: Vec<Box<[f32]>>,
    len: usize,
    /// Identity for a device copy of the rows (unique per store, a clone gets its own) and
    /// its version (bumped whenever rows are taken away, so a copy knows to start over).
    id: u64,
    version: u64,
}

/// A fresh identity for something a device may hold a copy of.
pub fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Clone for RowStore {
    fn clone(&self) -> RowStore {
        RowStore {
            width: self.width,
            block_rows: self.block_rows,
            blocks: self.blocks.clone(),
            len: self.len,
            id: next_id(),
            version: 0,
        }
    }
}

impl RowStore {
    pub fn new(width: usize, block_rows: usize) -> RowStore {
        RowStore {
            width,
            block_rows: block_rows.max(1),
            blocks: Vec::new(),
            len: 0,
            id: next_id(),
            version: 0,
        }
    }

    /// (identity, version) for a device copy (see the fields).
    pub fn identity(&self) -> (u64, u64) {
        (self.id, self.version)
    }

    /// Rows a..b, contiguous.
    pub fn rows(&self, r: std::ops::Range<usize>) -> Vec<f32> {
        let mut v = Vec::with_capacity(r.len() * self.width);
        for i in r {
            v.extend_from_slice(self.row(i));
        }
        v
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn push(&mut self, row: &[f32]) {
        debug_assert_eq!(row.len(), self.width);
        let (b, i) = (self.len / self.block_rows, self.len % self.block_rows);
        if b == self.blocks.len() {
            self.blocks
                .push(vec![0f32; self.block_rows * self.width].into_boxed_slice());
        }
        self.blocks[b][i * self.width..(i + 1) * self.width].copy_from_slice(row);
        self.len += 1;
    }

    pub fn row(&self, i: usize) -> &[f32] {
        debug_assert!(i < self.len);
        let (b, j) = (i / self.block_rows, i % self.block_rows);
        &self.blocks[b][j * self.width..(j + 1) * self.width]
    }

    /// Bytes allocated (whole blocks).
    pub fn allocated_bytes(&self) -> usize {
        self.blocks.len() * self.block_rows * self.width * 4
    }

    /// Keep the first `n` rows (blocks past them are freed).
    pub fn truncate(&mut self, n: usize) {
        if n < self.len {
            self.version += 1;
            self.len = n;
            self.blocks.truncate(n.div_ceil(self.block_rows));
        }
    }

    pub fn clear(&mut self) {
        self.version += 1;
        self.blocks.clear();
        self.len = 0;
    }

    /// Write the rows, a block at a time.
    pub(super) fn save(&self, e: &mut Enc) -> std::io::Result<()> {
        e.u64(self.len)?;
        for (b, block) in self.blocks.iter().enumerate() {
            let rows = (self.len - b * self.block_rows).min(self.block_rows);
            e.rows(&block[..rows * self.width], self.width)?;
        }
        Ok(())
    }

    /// Read back `n` rows into this empty store.
    pub(super) fn load(&mut self, d: &mut Dec, n: usize, what: &str) -> Result<(), SnapshotError> {
        debug_assert!(self.is_empty());
        d.count(n, what)?;
        while self.len < n {
            let k = (n - self.len).min(self.block_rows);
            let rows = d.rows(k * self.width, self.width, what)?;
            let mut block = vec![0f32; self.block_rows * self.width];
            block[..rows.len()].copy_from_slice(&rows);
            self.blocks.push(block.into_boxed_slice());
            self.len += k;
        }
        Ok(())
    }
}

/// The last `size` rows by absolute position (slot = pos mod size). Memory grows with the
/// slots written, so a large window costs only what a conversation uses.
#[derive(Debug, Clone)]
pub struct WindowRing {
    width: usize,
    size: usize,
    data: Vec<f32>,
    /// What a slot never written reads as.
    zeros: Vec<f32>,
}

impl WindowRing {
    pub fn new(size: usize, width: usize) -> WindowRing {
        WindowRing {
            width,
            size: size.max(1),
            data: Vec::new(),
            zeros: vec![0f32; width],
        }
    }

    /// Rows it holds (the window).
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn put(&mut self, pos: usize, row: &[f32]) {
        let s = pos % self.size;
        let end = (s + 1) * self.width;
        if self.data.len() < end {
            self.data.resize(end, 0.0);
        }
        self.data[s * self.width..end].copy_from_slice(row);
    }

    /// Row for absolute position `pos` (caller guarantees it is among the last `size`).
    pub fn get(&self, pos: usize) -> &[f32] {
        let s = pos % self.size;
        self.data
            .get(s * self.width..(s + 1) * self.width)
            .unwrap_or(&self.zeros)
    }

    pub fn allocated_bytes(&self) -> usize {
        (self.data.capacity() + self.zeros.len()) * 4
    }

    /// Write the rows of the last positions before `len` it holds (by position, so a ring of
    /// another size reads them back).
    pub(super) fn save(&self, e: &mut Enc, len: usize) -> std::io::Result<()> {
        let from = len - len.min(self.size);
        e.u64(len - from)?;
        let rows: Vec<f32> = (from..len).flat_map(|p| self.get(p)).copied().collect();
        e.rows(&rows, self.width)
    }

    /// Read back what `save` wrote at `len` (window = the rows a query reaches back).
    pub(super) fn load(
        &mut self,
        d: &mut Dec,
        len: usize,
        window: usize,
    ) -> Result<(), SnapshotError> {
        let from = len - len.min(window);
        d.count(len - from, "window rows")?;
        let rows = d.rows((len - from) * self.width, self.width, "window")?;
        for (p, row) in (from..len).zip(rows.chunks_exact(self.width.max(1))) {
            self.put(p, row);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_store_grows_in_blocks() {
        let mut s = RowStore::new(3, 4);
        assert_eq!(s.allocated_bytes(), 0);
        for i in 0..9 {
            s.push(&[i as f32, 0.0, -(i as f32)]);
        }
        assert_eq!(s.len(), 9);
        assert_eq!(s.row(6), &[6.0, 0.0, -6.0]);
        assert_eq!(s.allocated_bytes(), 3 * 4 * 3 * 4); // three blocks of 4 rows
    }

    #[test]
    fn ring_keeps_last_positions() {
        let mut r = WindowRing::new(4, 1);
        for p in 0..10 {
            r.put(p, &[p as f32]);
        }
        assert_eq!(r.get(9), &[9.0]);
        assert_eq!(r.get(6), &[6.0]);
    }

    #[test]
    fn ring_memory_follows_use_not_size() {
        let mut r = WindowRing::new(1 << 30, 512);
        assert!(r.allocated_bytes() < 4096);
        r.put(0, &[1.0; 512]);
        r.put(1, &[2.0; 512]);
        assert_eq!(r.get(1)[0], 2.0);
        assert_eq!(r.get(5)[0], 0.0, "a slot never written reads as zeros");
        assert!(r.allocated_bytes() < 64 * 512 * 4);
    }
}
