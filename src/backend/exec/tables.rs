//! Key tables kept on the device across steps: per attention block, its window ring, this
//! step's rows and its compressed rows (and the indexer's keys), copied only as they grow.

use super::Exec;
use crate::backend::device::{Buf, Device, lock};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

/// A key table kept on the device (see [`KeyTables::get`]).
struct KeyTable {
    buf: Buf,
    width: usize,
    version: u64,
    /// Rows reserved at the front for the rows the caller writes.
    local_rows: usize,
    /// Rows the buffer holds.
    cap_rows: usize,
    /// Store rows already on the device.
    synced: usize,
}

/// The tables, by the id of the host store they mirror.
#[derive(Default)]
pub struct KeyTables(Mutex<HashMap<u64, KeyTable>>);

impl KeyTables {
    /// A key table that stays on the device across steps: `head` rows the caller writes
    /// itself ([`Exec::write_rows`]; e.g. a ring of recent rows and the current chunk's),
    /// followed by the first `n` rows of an append-only host store; `id` names the table,
    /// and a new `version` means the store was cut back, so it is copied again from its
    /// start. Only the store's rows added since the last call are copied; `rows(a..b)` gives
    /// them. Returns the buffer, the row at which the store's rows begin (>= `head`), and
    /// whether the buffer is new (the head rows are then unset). None when ops do not run
    /// on the device here or it has no room (the caller uses its host path).
    #[allow(clippy::too_many_arguments)] // the table's name and version, its shape, its rows
    pub fn get(
        &self,
        ex: &Exec,
        id: u64,
        version: u64,
        width: usize,
        head: usize,
        n: usize,
        rows: impl Fn(Range<usize>) -> Vec<f32>,
    ) -> Option<(Buf, usize, bool)> {
        let dev = ex.usable_device()?;
        let mut g = lock(&self.0);
        let fits = g.get(&id).is_some_and(|m| {
            m.version == version
                && m.width == width
                && head <= m.local_rows
                && m.local_rows + n <= m.cap_rows
                && n >= m.synced
        });
        let fresh = !fits;
        if fresh {
            let old = g.remove(&id);
            let head_cap = head.max(old.as_ref().map_or(0, |m| m.local_rows));
            // Room to grow by a quarter (at least 1024 rows) before the next full copy.
            let store_cap = (n + n / 4).max(n + 1024);
            if let Some(m) = old {
                dev.free(m.buf);
            }
            let buf = ex.alloc(4 * width * (head_cap + store_cap))?;
            g.insert(
                id,
                KeyTable {
                    buf,
                    width,
                    version,
                    local_rows: head_cap,
                    cap_rows: head_cap + store_cap,
                    synced: 0,
                },
            );
        }
        let m = g.get_mut(&id)?;
        if n > m.synced {
            let new = rows(m.synced..n);
            if !ex.write_rows(m.buf, m.local_rows + m.synced, width, &new) {
                return None;
            }
            m.synced = n;
        }
        Some((m.buf, m.local_rows, fresh))
    }

    /// Free the device tables of these stores (their session ended or was reset).
    pub fn forget(&self, ex: &Exec, ids: impl IntoIterator<Item = u64>) {
        let Some(dev) = ex.device() else {
            return;
        };
        let mut g = lock(&self.0);
        for id in ids {
            if let Some(m) = g.remove(&id) {
                dev.free(m.buf);
            }
        }
    }

    /// Device bytes held by key tables.
    pub fn bytes(&self) -> u64 {
        lock(&self.0)
            .values()
            .map(|m| (4 * m.width * m.cap_rows) as u64)
            .sum()
    }

    /// Free every table (the executor is going away).
    pub(super) fn free_all(&mut self, dev: &dyn Device) {
        let g = self.0.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, m) in g.drain() {
            dev.free(m.buf);
        }
    }
}
