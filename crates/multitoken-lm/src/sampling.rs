//! Choosing the next token from a row of logits, as transformers' `generate` does.
//!
//! The processors run in transformers' order: repetition penalty, then temperature,
//! top-k and top-p, then a draw from the softmax (or the argmax when greedy). Greedy
//! decoding still applies the repetition penalty, as transformers does. The random
//! draw uses a [`StdRng`] seeded from [`SamplingParams::seed`], so a seed reproduces a
//! run exactly on the same build.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// How to pick the next token. The defaults are greedy decoding.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `None` or `0` means greedy (argmax).
    pub temperature: Option<f64>,
    /// Keep only the `k` most likely tokens (ties with the k-th kept); `None` or `0`
    /// disables.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probabilities sum to at
    /// least `p`; `None` or `1.0` disables.
    pub top_p: Option<f64>,
    /// transformers' repetition penalty over every id seen so far (prompt included):
    /// positive logits are divided by it, negative ones multiplied; `None` or `1.0`
    /// disables.
    pub repetition_penalty: Option<f32>,
    /// Seed of the random draw; `None` seeds from the operating system.
    pub seed: Option<u64>,
}

impl SamplingParams {
    /// Greedy decoding (argmax, no penalty).
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether this picks the argmax rather than drawing.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_none_or(|t| t == 0.0)
    }

    /// Checks the ranges transformers accepts, naming the bad parameter.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.temperature {
            if !t.is_finite() || t < 0.0 {
                return Err(Error::Msg(format!("temperature must be a finite number >= 0, got {t}")));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Msg(format!("top_p must be in (0, 1], got {p}")));
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !r.is_finite() || r <= 0.0 {
                return Err(Error::Msg(format!("repetition_penalty must be a finite number > 0, got {r}")));
            }
        }
        Ok(())
    }
}

/// Picks tokens according to [`SamplingParams`], keeping its random state between
/// calls.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch space reused between calls: `(logit, id)` of the candidates.
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler for `params` (validated).
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self { params, rng, candidates: Vec::new() })
    }

    /// The parameters this sampler uses.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token from a logits tensor of shape `[vocab]` or `[1, vocab]` (any
    /// float dtype; converted to f32), penalising the ids in `previous`.
    pub fn sample_tensor(&mut self, logits: &Tensor, previous: &[u32]) -> Result<u32> {
        let logits = logits.flatten_all()?.to_dtype(DType::F32)?;
        let mut row = logits.to_vec1::<f32>()?;
        self.sample(&mut row, previous)
    }

    /// The next token from one row of logits, penalising the ids in `previous`.
    /// `logits` is used as scratch space and is modified.
    pub fn sample(&mut self, logits: &mut [f32], previous: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::Msg("cannot sample from an empty row of logits".into()));
        }
        if let Some(penalty) = self.params.repetition_penalty.filter(|&p| p != 1.0) {
            apply_repetition_penalty(logits, previous, penalty);
        }
        if self.params.is_greedy() {
            return Ok(argmax(logits));
        }
        let temperature = self.params.temperature.unwrap_or(1.0) as f32;
        // A temperature so small that `logit / t` overflows (1e-45) would give
        // infinities whose softmax is NaN: then the logits are shifted by their
        // maximum first, which leaves the distribution as it is and gives its
        // limit, the greedy choice (ties shared), instead of an error.
        let max = logits.iter().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, |m, &l| m.max(l));
        let shift = if (max / temperature).is_finite() || !max.is_finite() { 0.0 } else { max };
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| ((l - shift) / temperature, i as u32)),
        );
        if let Some(k) = self.params.top_k.filter(|&k| k > 0) {
            top_k_filter(&mut self.candidates, k);
        }
        let mut probs = softmax(&self.candidates);
        if let Some(p) = self.params.top_p.filter(|&p| p < 1.0) {
            top_p_filter(&mut self.candidates, &mut probs, p);
        }
        let total: f64 = probs.iter().map(|&p| p as f64).sum();
        if !(total > 0.0 && total.is_finite()) {
            return Err(Error::Msg("no token has a finite logit to sample from".into()));
        }
        let mut u = self.rng.random::<f64>() * total;
        for (&p, &(_, id)) in probs.iter().zip(&self.candidates) {
            u -= p as f64;
            if u < 0.0 {
                return Ok(id);
            }
        }
        // Rounding left `u` a hair above zero: the last token with mass wins.
        let last = probs.iter().rposition(|&p| p > 0.0).unwrap_or(0);
        Ok(self.candidates.get(last).map_or(0, |c| c.1))
    }
}

/// One row of a batched draw: its sampler, its logits (changed in place as
/// [`Sampler::sample`] changes them) and the ids it has seen.
pub struct SampleRow<'a> {
    /// The row's own sampler (its own random state).
    pub sampler: &'a mut Sampler,
    /// The row's logits.
    pub logits: Vec<f32>,
    /// Prompt and generated ids (repetition penalty).
    pub previous: &'a [u32],
}

/// [`Sampler::sample`] for every row, rows spread over the kernels' pool: a
/// decode step of many sequences spent a tenth of its time drawing over the
/// vocabulary one row after another. Each row's token is exactly what its
/// sampler draws alone (its own logits, its own generator), whatever thread
/// runs it. Results come back in row order.
pub fn sample_rows(rows: Vec<SampleRow<'_>>) -> Vec<Result<u32>> {
    let cells: Vec<std::sync::Mutex<(SampleRow<'_>, Option<Result<u32>>)>> =
        rows.into_iter().map(|row| std::sync::Mutex::new((row, None))).collect();
    multitoken_kernels::pool::for_each_item(cells.len(), |i| {
        // Each item is locked by one thread only, once: the lock never waits.
        if let Ok(mut cell) = cells[i].lock() {
            let (row, out) = &mut *cell;
            *out = Some(row.sampler.sample(&mut row.logits, row.previous));
        }
    });
    cells
        .into_iter()
        .map(|cell| match cell.into_inner() {
            Ok((_, Some(result))) => result,
            _ => Err(Error::Msg("a sampling thread failed".into())),
        })
        .collect()
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each id seen (once, however often
/// it occurs) has its logit divided by `penalty` when positive, multiplied when not.
/// Ids outside the vocabulary are ignored.
pub fn apply_repetition_penalty(logits: &mut [f32], previous: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &id in previous {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let l = logits[i];
            logits[i] = if l < 0.0 { l * penalty } else { l / penalty };
        }
    }
}

/// Index of the largest logit (the first on ties; NaN never wins unless all are NaN).
///
/// Two passes that the compiler vectorises (the largest value over sixteen
/// independent lanes, then the first index holding it) instead of one branchy
/// scalar pass: a greedy decode step of a 49,152-word vocabulary spent ~0.2 ms
/// (about 2% of SmolLM2-135M's step) in the scalar loop.
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            // `l > m` is false for NaN, so NaN never becomes the maximum.
            *m = if l > *m { l } else { *m };
        }
    }
    let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    if max > f32::NEG_INFINITY {
        if let Some(i) = logits.iter().position(|&l| l == max) {
            return i as u32;
        }
    }
    // Every logit is -inf or NaN: the first that is not NaN, as the scalar rule gives.
    argmax_scalar(logits)
}

/// [`argmax`] by one scalar pass.
fn argmax_scalar(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_nan() && (!found || l > best_value) {
            best = i;
            best_value = l;
            found = true;
        }
    }
    best as u32
}

/// Keeps candidates whose logit is at least the k-th largest (ties kept, as
/// transformers' `TopKLogitsWarper` does).
fn top_k_filter(candidates: &mut Vec<(f32, u32)>, k: usize) {
    if k >= candidates.len() {
        return;
    }
    let (_, kth, _) = candidates.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
    let threshold = kth.0;
    candidates.retain(|c| c.0 >= threshold);
}

/// Softmax of the candidates' logits, in f32 like transformers.
fn softmax(candidates: &[(f32, u32)]) -> Vec<f32> {
    let max = candidates.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![0.0; candidates.len()];
    }
    let mut probs: Vec<f32> = candidates.iter().map(|c| (c.0 - max).exp()).collect();
    let sum: f32 = probs.iter().sum();
    for p in &mut probs {
        *p /= sum;
    }
    probs
}

/// transformers' `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative
/// probability is `<= 1 - top_p`, always keep the most likely one. Candidates and
/// probabilities come back sorted most likely first.
fn top_p_filter(candidates: &mut Vec<(f32, u32)>, probs: &mut Vec<f32>, top_p: f64) {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    // Ascending by probability; ties by id descending so that, read backwards, equal
    // tokens come lowest id first.
    order.sort_unstable_by(|&a, &b| probs[a].total_cmp(&probs[b]).then(candidates[b].1.cmp(&candidates[a].1)));
    let cut = (1.0 - top_p) as f32;
    let mut cumulative = 0.0f32;
    let mut first_kept = order.len().saturating_sub(1);
    for (pos, &i) in order.iter().enumerate() {
        cumulative += probs[i];
        if cumulative > cut {
            first_kept = pos.min(order.len().saturating_sub(1));
            break;
        }
    }
    let kept: Vec<usize> = order[first_kept..].iter().rev().copied().collect();
    let new_candidates: Vec<(f32, u32)> = kept.iter().map(|&i| candidates[i]).collect();
    let new_probs: Vec<f32> = kept.iter().map(|&i| probs[i]).collect();
    *candidates = new_candidates;
    *probs = new_probs;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn params(temperature: Option<f64>, top_k: Option<usize>, top_p: Option<f64>, penalty: Option<f32>) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, repetition_penalty: penalty, seed: Some(7) }
    }

    #[test]
    fn greedy_picks_argmax_after_penalty() {
        // (logits, previous ids, penalty, expected id)
        type Case<'a> = (&'a [f32], &'a [u32], Option<f32>, u32);
        let cases: &[Case] = &[
            (&[0.1, 2.0, 1.0], &[], None, 1),
            (&[3.0, 3.0, 1.0], &[], None, 0),
            (&[f32::NAN, -1.0, -2.0], &[], None, 1),
            // 2.0 / 2 = 1.0 < 1.5: the penalty moves the choice.
            (&[0.0, 2.0, 1.5], &[1], Some(2.0), 2),
            // repeated ids are penalised once: 4.0 / 2 = 2.0 > 1.5.
            (&[0.0, 4.0, 1.5], &[1, 1, 1], Some(2.0), 1),
            // negative logits are multiplied: -1 * 2 = -2 < -1.5.
            (&[-1.0, -1.5, -3.0], &[0], Some(2.0), 1),
            // ids outside the vocabulary are ignored.
            (&[0.0, 1.0], &[99], Some(2.0), 1),
        ];
        for (logits, previous, penalty, expected) in cases {
            let mut sampler = Sampler::new(params(None, None, None, *penalty)).unwrap();
            let mut row = logits.to_vec();
            assert_eq!(sampler.sample(&mut row, previous).unwrap(), *expected, "logits {logits:?} previous {previous:?}");
        }
    }

    /// The vectorised argmax picks what the scalar pass picks: ties (the first
    /// wins), NaN, infinities, signed zeros, rows of every length around a lane.
    #[test]
    fn argmax_is_the_scalar_rule() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        let specials = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, 0.0, -0.0, 1.0, -1.0];
        for len in [1usize, 2, 15, 16, 17, 31, 33, 100, 49_152] {
            for round in 0..40 {
                let row: Vec<f32> = (0..len)
                    .map(|_| match next() % 10 {
                        // Rounds ≥ 20 are mostly specials, so that all-NaN and
                        // all -inf rows (and ties among them) occur.
                        0..=3 if round < 20 => (next() % 8) as f32 - 4.0,
                        0..=6 if round < 20 => (next() as f32 / 1e6).sin(),
                        _ => specials[next() as usize % if round % 3 == 0 { 2 } else { specials.len() }],
                    })
                    .collect();
                assert_eq!(argmax(&row), argmax_scalar(&row), "len {len} round {round}: {row:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN; 20]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY]), 1);
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut sampler = Sampler::new(params(Some(0.0), Some(5), Some(0.5), None)).unwrap();
        for _ in 0..10 {
            assert_eq!(sampler.sample(&mut [0.5, 0.7, 0.6], &[]).unwrap(), 1);
        }
    }

    /// Issue 23: `temperature: 1e-45` made every logit infinite and sampling failed
    /// ("no token has a finite logit"); a tiny temperature now picks the largest
    /// logit (either of two tied ones), with any filter.
    #[test]
    fn a_vanishing_temperature_is_greedy() {
        for (top_k, top_p) in [(None, None), (Some(2), None), (None, Some(0.9))] {
            let mut sampler = Sampler::new(params(Some(1e-45), top_k, top_p, None)).unwrap();
            for _ in 0..10 {
                assert_eq!(sampler.sample(&mut [0.5, 3.0, -2.0, 1.0], &[]).unwrap(), 1);
                assert_eq!(sampler.sample(&mut [-7.0, -9.0], &[]).unwrap(), 0);
                assert!(matches!(sampler.sample(&mut [4.0, 1.0, 4.0], &[]).unwrap(), 0 | 2));
            }
        }
    }

    #[test]
    fn filters_restrict_the_draw() {
        // (params, logits, ids that may be drawn)
        let ln = |p: f32| p.ln();
        let cases: Vec<(SamplingParams, Vec<f32>, Vec<u32>)> = vec![
            (params(Some(1.0), Some(1), None, None), vec![0.0, 5.0, 4.9], vec![1]),
            (params(Some(1.0), Some(2), None, None), vec![0.0, 5.0, 4.9, -3.0], vec![1, 2]),
            // ties with the k-th are kept.
            (params(Some(1.0), Some(1), None, None), vec![1.0, 1.0, 0.0], vec![0, 1]),
            // probabilities .5 .3 .15 .05: top_p .7 keeps {0, 1}; .75 also keeps {0, 1}
            // (cumulative from the bottom .05 .2 .5 <= .25 drops two); .85 keeps three.
            (params(Some(1.0), None, Some(0.7), None), vec![ln(0.5), ln(0.3), ln(0.15), ln(0.05)], vec![0, 1]),
            (params(Some(1.0), None, Some(0.75), None), vec![ln(0.5), ln(0.3), ln(0.15), ln(0.05)], vec![0, 1]),
            (params(Some(1.0), None, Some(0.85), None), vec![ln(0.5), ln(0.3), ln(0.15), ln(0.05)], vec![0, 1, 2]),
            // a tiny top_p keeps only the most likely token.
            (params(Some(1.0), None, Some(1e-6), None), vec![ln(0.2), ln(0.5), ln(0.3)], vec![1]),
            // -inf logits are never drawn.
            (params(Some(2.0), None, None, None), vec![f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY], vec![1]),
        ];
        for (p, logits, allowed) in cases {
            let mut sampler = Sampler::new(p.clone()).unwrap();
            for _ in 0..200 {
                let id = sampler.sample(&mut logits.clone(), &[]).unwrap();
                assert!(allowed.contains(&id), "{p:?} on {logits:?} drew {id}, allowed {allowed:?}");
            }
        }
    }

    #[test]
    fn draws_follow_the_distribution_and_the_seed() {
        let logits = vec![0.25f32.ln(), 0.75f32.ln()];
        let mut sampler = Sampler::new(params(Some(1.0), None, None, None)).unwrap();
        let draws: Vec<u32> = (0..4000).map(|_| sampler.sample(&mut logits.clone(), &[]).unwrap()).collect();
        let ones = draws.iter().filter(|&&d| d == 1).count() as f64 / draws.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "drew id 1 with frequency {ones}");
        let mut again = Sampler::new(params(Some(1.0), None, None, None)).unwrap();
        let replay: Vec<u32> = (0..4000).map(|_| again.sample(&mut logits.clone(), &[]).unwrap()).collect();
        assert_eq!(draws, replay, "the same seed must give the same draws");
        // A high temperature flattens the distribution towards uniform.
        let mut hot = Sampler::new(params(Some(100.0), None, None, None)).unwrap();
        let ones = (0..4000).filter(|_| hot.sample(&mut logits.clone(), &[]).unwrap() == 1).count() as f64 / 4000.0;
        assert!((ones - 0.5).abs() < 0.05, "temperature 100 drew id 1 with frequency {ones}");
    }

    #[test]
    fn bad_parameters_and_rows_are_errors() {
        let bad = [
            params(Some(-1.0), None, None, None),
            params(Some(f64::NAN), None, None, None),
            params(Some(1.0), None, Some(0.0), None),
            params(Some(1.0), None, Some(1.5), None),
            params(None, None, None, Some(0.0)),
        ];
        for p in bad {
            assert!(Sampler::new(p.clone()).is_err(), "{p:?} should be rejected");
        }
        let mut sampler = Sampler::new(params(Some(1.0), None, None, None)).unwrap();
        assert!(sampler.sample(&mut [], &[]).is_err());
        assert!(sampler.sample(&mut [f32::NEG_INFINITY, f32::NAN], &[]).is_err());
    }

    #[test]
    fn samples_from_tensors_of_any_float_dtype() {
        let t = Tensor::new(&[[0.0f32, 3.0, 1.0]], &candle_core::Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
            assert_eq!(sampler.sample_tensor(&t.to_dtype(dtype).unwrap(), &[]).unwrap(), 1);
        }
    }
}
