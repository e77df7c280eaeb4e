//! Tensor entry points of the decoder LM's inference kernels: the decode
//! step's matrix-vector products ([`cpu::gemv`]) and the prefill's causal
//! grouped-query attention ([`cpu::causal_attention`]).
//!
//! Each returns `None` when its fast path does not apply (a tensor that tracks
//! gradients, not f32, not on the CPU, an unusual layout), and the caller then
//! keeps its candle ops.

use candle_core::{Result, Tensor};

use crate::{assume_init, cpu, cpu_data, fast_path, output_buffer};

/// The most rows [`linear_rows`] takes: beyond this a GEMM reuses each weight
/// from cache across rows better than a row-at-a-time product.
pub const GEMV_MAX_ROWS: usize = 15;

/// `x W^T` for `x` `[rows, k]` with `rows <= GEMV_MAX_ROWS` and `w` `[n, k]`
/// (row-major, as PyTorch's `nn.Linear.weight`): `[rows, n]`, each weight
/// streamed once over the pool's threads. `None` when the fast path does not
/// apply (more rows, a non-contiguous weight, or see the module docs).
pub fn linear_rows(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if x.dims2()?.0 > GEMV_MAX_ROWS {
        return Ok(None);
    }
    linear_each_row(x, w)
}

/// `x W^T` for `x` `[rows, k]`, any number of rows, where every output row is
/// bit for bit what [`linear_rows`] gives that row alone: each output is one
/// dot product in a fixed order, whatever the rows around it (the batched
/// decode step of several sequences relies on it to answer exactly as each
/// sequence decoded alone). The weight is streamed once; each block of its
/// rows is multiplied by every `x` row while it is in L1. `None` when the fast
/// path does not apply (a non-contiguous weight, or see the module docs).
pub fn linear_each_row(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    Ok(linear_each_row_many(x, &[w])?.and_then(|ys| ys.into_iter().next()))
}

/// Several [`linear_each_row`] products of one `x` (`[rows, k]`) in one call on
/// the pool ([`cpu::gemv_many`]): each output bit for bit what
/// [`linear_each_row`] gives it alone, a decode step's q / k / v or gate / up
/// with one hand-off instead of two or three (SmolLM2's f32 products alone,
/// 30 layers streamed from memory on the 2-core Zen 5 VM, 2026-12-07: 12.8-14.1
/// against 14.7-18.2 ms a token, six alternating passes; in the whole f32
/// decode step, 200-token `generate` runs, faster in 6 of 8 alternating pairs,
/// median 1.03× the tokens/s, within the VM's drift). `None` when the fast path
/// does not apply to every weight.
pub fn linear_each_row_many(x: &Tensor, ws: &[&Tensor]) -> Result<Option<Vec<Tensor>>> {
    let (rows, k) = x.dims2()?;
    let mut shapes = Vec::with_capacity(ws.len());
    for w in ws {
        let (n, wk) = w.dims2()?;
        if wk != k {
            candle_core::bail!("linear_rows: x {:?} and weight {:?} do not fit together", x.dims(), w.dims());
        }
        if !w.is_contiguous() || !fast_path(&[x, w]) {
            return Ok(None);
        }
        shapes.push(n);
    }
    let x = x.contiguous()?;
    let mut outs: Vec<Vec<std::mem::MaybeUninit<f32>>> = shapes.iter().map(|&n| output_buffer(rows * n)).collect();
    {
        let (xs, xl) = x.storage_and_layout();
        let storages: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
        let mut weights = Vec::with_capacity(ws.len());
        for ((storage, layout), &n) in storages.iter().zip(&shapes) {
            weights.push((cpu_data(storage, layout)?, n));
        }
        let mut out_refs: Vec<&mut [std::mem::MaybeUninit<f32>]> = outs.iter_mut().map(|o| &mut o[..]).collect();
        cpu::gemv_many(cpu_data(&xs, xl)?, rows, k, &weights, &mut out_refs);
    }
    outs.into_iter()
        .zip(shapes)
        // SAFETY: gemv_many writes every element of each output.
        .map(|(out, n)| Tensor::from_vec(unsafe { assume_init(out) }, (rows, n), x.device()))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Rows from which [`add`] spreads over the pool: below, one thread is faster.
const ADD_PARALLEL_FROM_ROWS: usize = 32;

/// `a + b` for two contiguous f32 tensors of one shape (the residual adds of
/// a prefill), rows of the last axis spread over the pool; exactly candle's
/// sums. `None` when the fast path does not apply (fewer than 32 rows, other
/// layouts, or see the module docs): candle's add runs its element-wise map
/// on its own pool, which the binary sizes to one thread.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let width = a.dims().last().copied().unwrap_or(1).max(1);
    let n = a.elem_count();
    if a.dims() != b.dims() || n / width < ADD_PARALLEL_FROM_ROWS || !a.is_contiguous() || !b.is_contiguous() || !fast_path(&[a, b]) {
        return Ok(None);
    }
    let mut out = output_buffer(n);
    {
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (xa, xb) = (&cpu_data(&sa, la)?[..n], &cpu_data(&sb, lb)?[..n]);
        cpu::for_each_row(n / width, width, 16, &mut out, |r, dst| {
            let (ra, rb) = (&xa[r * width..][..width], &xb[r * width..][..width]);
            for ((o, &x), &y) in dst.iter_mut().zip(ra).zip(rb) {
                o.write(x + y);
            }
        });
    }
    // SAFETY: for_each_row wrote every row.
    let out = unsafe { assume_init(out) };
    Ok(Some(Tensor::from_vec(out, a.dims(), a.device())?))
}

/// Causal attention with grouped key heads for a prefill: `q` `[b, heads, t,
/// head_dim]`, `k` and `v` `[b, kv_heads, keys, head_dim]` (`keys >= t`, the
/// cached positions first; views into a larger cache buffer need no copy).
/// Query `i` sits at position `keys - t + i` and sees every key up to it, with
/// no padding or window. Returns `[b, t, heads * head_dim]`, heads side by
/// side, or `None` when the fast path does not apply: no AVX-512, a head width
/// that is not a multiple of 16 (see [`cpu::causal_fast`]), or see the module docs.
///
/// `bf16`: run the two products in bf16 ([`cpu::causal_attention_bf16`],
/// `--dtype bf16`) where the CPU has AVX-512 BF16; elsewhere f32.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bf16: bool) -> Result<Option<Tensor>> {
    let (b, heads, t, head_dim) = q.dims4()?;
    let (kb, kv_heads, keys, kd) = k.dims4()?;
    if kb != b || kd != head_dim || v.dims() != k.dims() || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || keys < t {
        candle_core::bail!(
            "causal_attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if !cpu::causal_fast(head_dim) || !fast_path(&[q, k, v]) {
        return Ok(None);
    }
    let dense_last = |t: &Tensor| -> Result<Tensor> {
        if t.stride()[3] == 1 {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    let (q, k, v) = (dense_last(q)?, dense_last(k)?, dense_last(v)?);
    let mut out = output_buffer(b * t * heads * head_dim);
    {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let strides = |l: &candle_core::Layout| [l.stride()[0], l.stride()[1], l.stride()[2]];
        let operand = |data, l| cpu::Strided4 { data, strides: strides(l) };
        let (q, k, v) = (operand(cpu_data(&qs, ql)?, ql), operand(cpu_data(&ks, kl)?, kl), operand(cpu_data(&vs, vl)?, vl));
        let shape = cpu::CausalShape { batch: b, heads, kv_heads, queries: t, keys, head_dim };
        if !(bf16 && cpu::causal_attention_bf16(q, k, v, shape, scale as f32, &mut out)) {
            cpu::causal_attention(q, k, v, shape, scale as f32, &mut out);
        }
    }
    // SAFETY: causal_attention writes every element of its output.
    let out = unsafe { assume_init(out) };
    Ok(Some(Tensor::from_vec(out, (b, t, heads * head_dim), q.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, random};

    #[test]
    fn add_matches_candle_exactly() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (3, 40, 72), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (3, 40, 72), &dev).unwrap();
        let want: Vec<f32> = (&a + &b).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = super::add(&a, &b).unwrap().expect("fast path");
        assert_eq!(got.dims(), a.dims());
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        // Few rows: candle's add.
        let small = Tensor::ones((4, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(super::add(&small, &small).unwrap().is_none());
    }

    #[test]
    fn linear_rows_matches_matmul_and_declines_what_it_cannot_take() {
        let w = random(&[67, 95], 1);
        for rows in [1, 3, 15] {
            let x = random(&[rows, 95], 2 + rows as u64);
            let got = linear_rows(&x, &w).unwrap().unwrap();
            assert!(max_diff(&got, &x.matmul(&w.t().unwrap()).unwrap()) < 1e-5);
        }
        assert!(linear_rows(&random(&[16, 95], 3), &w).unwrap().is_none());
        // Any number of rows: each row exactly as alone.
        let x = random(&[40, 95], 9);
        let all = linear_each_row(&x, &w).unwrap().unwrap().to_vec2::<f32>().unwrap();
        for (r, row) in all.iter().enumerate() {
            let one = linear_rows(&x.narrow(0, r, 1).unwrap(), &w).unwrap().unwrap();
            assert_eq!(&one.to_vec2::<f32>().unwrap()[0], row, "row {r}");
        }
        assert!(linear_rows(&random(&[2, 67], 3), &w.t().unwrap()).unwrap().is_none());
        assert!(linear_rows(&random(&[2, 94], 3), &w).is_err());
    }

    #[test]
    fn causal_attention_matches_masked_softmax_with_a_strided_cache() {
        // 9 query heads over 3 key heads, 37 new positions after 20 cached ones,
        // k and v views into a buffer of 80 positions.
        let (b, heads, kvh, t, seen, hd) = (2, 9, 3, 37, 20, 64);
        let q = random(&[b, heads, t, hd], 1);
        let k = random(&[b, kvh, 80, hd], 2).narrow(2, 0, seen + t).unwrap();
        let v = random(&[b, kvh, 80, hd], 3).narrow(2, 0, seen + t).unwrap();
        let scale = 0.125;
        let Some(got) = causal_attention(&q, &k, &v, scale, false).unwrap() else {
            assert!(!cpu::causal_fast(hd));
            return;
        };
        let n_rep = heads / kvh;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..seen + t).map(move |j| if j <= seen + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, seen + t), q.device()).unwrap();
        let qg = (&q * scale).unwrap().reshape((b, kvh, n_rep * t, hd)).unwrap();
        let scores = qg.matmul(&k.t().unwrap()).unwrap().reshape((b, kvh, n_rep, t, seen + t)).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap().reshape((b, kvh, n_rep * t, seen + t)).unwrap()).unwrap();
        let want = probs
            .matmul(&v.contiguous().unwrap())
            .unwrap()
            .reshape((b, heads, t, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, heads * hd))
            .unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        // In bf16 where the CPU has it: within bf16's rounding, and not the
        // f32 result (so it did run in bf16).
        let bf16 = causal_attention(&q, &k, &v, scale, true).unwrap().expect("the f32 path applies, so this does");
        let diff = max_diff(&bf16, &want);
        if cpu::causal_bf16_fast(hd) {
            assert!(diff < 1e-2 && diff > 1e-5, "bf16: max diff {diff}");
        } else {
            assert!(diff < 1e-5, "f32 in place of bf16: max diff {diff}");
        }
    }
}
