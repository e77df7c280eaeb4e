//! Tensor entry points of the decoder LM's inference kernels: the decode
//! step's matrix-vector products ([`cpu::gemv`]).
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
    let (rows, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    if wk != k {
        candle_core::bail!("linear_rows: x {:?} and weight {:?} do not fit together", x.dims(), w.dims());
    }
    if rows > GEMV_MAX_ROWS || !w.is_contiguous() || !fast_path(&[x, w]) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let mut out = output_buffer(rows * n);
    {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        cpu::gemv(cpu_data(&xs, xl)?, rows, k, cpu_data(&ws, wl)?, n, &mut out);
    }
    // SAFETY: gemv writes every element of its output.
    let out = unsafe { assume_init(out) };
    Ok(Some(Tensor::from_vec(out, (rows, n), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, random};

    #[test]
    fn linear_rows_matches_matmul_and_declines_what_it_cannot_take() {
        let w = random(&[67, 95], 1);
        for rows in [1, 3, 15] {
            let x = random(&[rows, 95], 2 + rows as u64);
            let got = linear_rows(&x, &w).unwrap().unwrap();
            assert!(max_diff(&got, &x.matmul(&w.t().unwrap()).unwrap()) < 1e-5);
        }
        assert!(linear_rows(&random(&[16, 95], 3), &w).unwrap().is_none());
        assert!(linear_rows(&random(&[2, 67], 3), &w.t().unwrap()).unwrap().is_none());
        assert!(linear_rows(&random(&[2, 94], 3), &w).is_err());
    }
}
