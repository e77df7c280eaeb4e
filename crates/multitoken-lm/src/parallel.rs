//! Filling an f32 output buffer from several CPU threads.
//!
//! The hand-written kernels (quantized matrix-vector products, decode attention)
//! run ~300 times per decode step for tens of microseconds each. They use
//! `multitoken_kernels::pool` rather than rayon: waking parked rayon workers for
//! every call costs more than the second core gives back, and unlike candle's
//! barrier pool it does not wait for a thread that another process keeps off
//! the core.

/// Calls `f(first_item, items)` on disjoint runs of `out`, which holds
/// `out.len() / item_len` items of `item_len` values each; spread over the
/// kernels' pool when `parallel`, else one call on the calling thread.
pub(crate) fn fill_items(out: &mut [f32], item_len: usize, parallel: bool, f: impl Fn(usize, &mut [f32]) + Sync) {
    let n_items = out.len().checked_div(item_len).unwrap_or(0);
    if !parallel || n_items < 2 {
        f(0, out);
        return;
    }
    let base = SharedOut(out.as_mut_ptr());
    let base = &base;
    multitoken_kernels::pool::for_each_range(n_items, |range| {
        // SAFETY: `for_each_range` hands out disjoint ranges of `0..n_items`,
        // so each call gets its own `item_len`-wide items of `out`, which is
        // borrowed mutably for the whole pool call.
        let items = unsafe { std::slice::from_raw_parts_mut(base.0.add(range.start * item_len), range.len() * item_len) };
        f(range.start, items);
    });
}

/// The output buffer, written by the pool's threads at disjoint offsets.
struct SharedOut(*mut f32);
// SAFETY: only used to hand disjoint sub-slices to the pool's threads.
unsafe impl Sync for SharedOut {}
