//! The mixture-of-experts feed-forward that replaces a decoder layer's MLP.
//!
//! Per token: gate logits `x W_g^T + b_g` over the experts, the top-k experts by
//! probability, their weights by [`Routing`], and the weighted sum of the
//! selected experts' outputs. Dispatch is sparse: the rows routed to an expert
//! are gathered, run through it in one batch and scatter-added back, so each
//! token costs k expert MLPs, not all of them (Cephalo's reference runs every
//! expert and discards most). [`Dispatch::Dense`] keeps Cephalo's way for
//! benchmarks and tests.

use candle_core::{DType, Tensor};
use multitoken_lm::model::{FeedForward, Mlp};
use multitoken_lm::Linear;

use crate::config::Routing;
use crate::{Error, Result};

/// How the selected experts are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dispatch {
    /// Only the selected experts, on the rows routed to them.
    #[default]
    Sparse,
    /// Every expert on every row, unselected outputs weighted 0 (Cephalo).
    Dense,
}

/// A gate plus experts standing in for one layer's MLP.
#[derive(Debug, Clone)]
pub struct MoeFeedForward {
    gate: Linear,
    experts: Vec<Mlp>,
    k: usize,
    routing: Routing,
    dispatch: Dispatch,
}

impl MoeFeedForward {
    /// A mixture of `experts` behind `gate` (`[num_experts, hidden]`, with bias).
    pub fn new(gate: Linear, experts: Vec<Mlp>, k: usize, routing: Routing) -> Result<Self> {
        let n = experts.len();
        if n == 0 {
            return Err(Error::Msg(
                "a mixture of experts needs at least one expert".into(),
            ));
        }
        if k == 0 || k > n {
            return Err(Error::Msg(format!(
                "k = {k} must be between 1 and the number of experts ({n})"
            )));
        }
        if gate.out_dim() != n {
            return Err(Error::Msg(format!(
                "the gate has {} outputs for {n} experts",
                gate.out_dim()
            )));
        }
        if gate.bias().is_none() {
            return Err(Error::Msg("the gate has no bias".into()));
        }
        Ok(Self {
            gate,
            experts,
            k,
            routing,
            dispatch: Dispatch::Sparse,
        })
    }

    /// The same mixture computed with `dispatch`.
    pub fn with_dispatch(mut self, dispatch: Dispatch) -> Self {
        self.dispatch = dispatch;
        self
    }

    /// The gate.
    pub fn gate(&self) -> &Linear {
        &self.gate
    }

    /// The experts, in gate order.
    pub fn experts(&self) -> &[Mlp] {
        &self.experts
    }

    /// Experts computed per token.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The routing mode.
    pub fn routing(&self) -> Routing {
        self.routing
    }

    /// The same mixture with another gate (same shape).
    pub fn with_gate(&self, gate: Linear) -> Result<Self> {
        if gate.out_dim() != self.gate.out_dim() || gate.in_dim() != self.gate.in_dim() {
            return Err(Error::Msg(format!(
                "gate of [{}, {}] given, the layer needs [{}, {}]",
                gate.out_dim(),
                gate.in_dim(),
                self.gate.out_dim(),
                self.gate.in_dim()
            )));
        }
        Self::new(gate, self.experts.clone(), self.k, self.routing)
            .map(|m| m.with_dispatch(self.dispatch))
    }

    /// Per row of `x` (`[rows, hidden]`): the selected experts and their weights.
    pub fn route(&self, x: &Tensor) -> Result<Vec<Vec<(usize, f32)>>> {
        let logits = self.gate.forward(x)?.to_dtype(DType::F32)?;
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        Ok(logits
            .iter()
            .map(|row| route_row(row, self.k, self.routing))
            .collect())
    }

    fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, hidden) = x.dims2()?;
        let routes = self.route(x)?;
        match self.dispatch {
            Dispatch::Sparse => self.sparse(x, &routes, rows, hidden),
            Dispatch::Dense => self.dense(x, &routes, rows),
        }
    }

    fn sparse(
        &self,
        x: &Tensor,
        routes: &[Vec<(usize, f32)>],
        rows: usize,
        hidden: usize,
    ) -> Result<Tensor> {
        let n = self.experts.len();
        let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n];
        for (row, route) in routes.iter().enumerate() {
            for &(e, w) in route {
                per_expert[e].0.push(row as u32);
                per_expert[e].1.push(w);
            }
        }
        let (device, dtype) = (x.device(), x.dtype());
        let mut out: Option<Tensor> = None;
        for (expert, (idx, weights)) in self.experts.iter().zip(per_expert) {
            if idx.is_empty() {
                continue;
            }
            let m = idx.len();
            let w = Tensor::from_vec(weights, (m, 1), device)?.to_dtype(dtype)?;
            if m == rows && is_identity(&idx) {
                // Every row (e.g. a one-token decode step): no gather or scatter.
                let y = expert_forward(expert, x)?.broadcast_mul(&w)?;
                out = Some(match out {
                    Some(o) => (o + y)?,
                    None => y,
                });
                continue;
            }
            let idx = Tensor::from_vec(idx, m, device)?;
            let y = expert_forward(expert, &x.index_select(&idx, 0)?)?.broadcast_mul(&w)?;
            let acc = match out {
                Some(o) => o,
                None => Tensor::zeros((rows, hidden), dtype, device)?,
            };
            out = Some(acc.index_add(&idx, &y, 0)?);
        }
        match out {
            Some(o) => Ok(o),
            None => Ok(Tensor::zeros((rows, hidden), dtype, device)?),
        }
    }

    fn dense(&self, x: &Tensor, routes: &[Vec<(usize, f32)>], rows: usize) -> Result<Tensor> {
        let n = self.experts.len();
        let mut weights = vec![0f32; rows * n];
        for (row, route) in routes.iter().enumerate() {
            for &(e, w) in route {
                weights[row * n + e] = w;
            }
        }
        let weights = Tensor::from_vec(weights, (rows, n), x.device())?.to_dtype(x.dtype())?;
        let mut out: Option<Tensor> = None;
        for (e, expert) in self.experts.iter().enumerate() {
            let y = expert_forward(expert, x)?.broadcast_mul(&weights.narrow(1, e, 1)?)?;
            out = Some(match out {
                Some(o) => (o + y)?,
                None => y,
            });
        }
        out.ok_or_else(|| Error::Msg("a mixture of experts needs at least one expert".into()))
    }
}

impl FeedForward for MoeFeedForward {
    fn forward(&self, x: &Tensor) -> multitoken_lm::Result<Tensor> {
        let dims = x.dims().to_vec();
        let hidden = dims.last().copied().unwrap_or(0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let flat = x.reshape((rows, hidden))?;
        Ok(self.forward_rows(&flat)?.reshape(dims)?)
    }
}

/// Top-k experts of one row of gate logits and their weights under `routing`.
///
/// Ties go to the lower expert index, as `torch.topk` does on CPU in practice.
pub fn route_row(logits: &[f32], k: usize, routing: Routing) -> Vec<(usize, f32)> {
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(k);
    let top: Vec<f32> = order.iter().map(|&i| probs[i]).collect();
    let weights = match routing {
        Routing::Cephalo => softmax(&top),
        Routing::Renormalize => {
            let sum: f32 = top.iter().sum();
            top.iter()
                .map(|p| {
                    if sum > 0.0 {
                        p / sum
                    } else {
                        1.0 / top.len() as f32
                    }
                })
                .collect()
        }
    };
    order.into_iter().zip(weights).collect()
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = v.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

fn is_identity(idx: &[u32]) -> bool {
    idx.iter().enumerate().all(|(i, &v)| i as u32 == v)
}

/// An expert on `[m, hidden]` rows.
fn expert_forward(expert: &Mlp, x: &Tensor) -> Result<Tensor> {
    Ok(expert.forward(&x.unsqueeze(0)?)?.squeeze(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(logits: &[f32], k: usize, routing: Routing, expect: &[(usize, f32)]) {
        let got = route_row(logits, k, routing);
        assert_eq!(got.len(), expect.len());
        for ((ge, gw), (ee, ew)) in got.iter().zip(expect) {
            assert_eq!(ge, ee);
            assert!((gw - ew).abs() < 1e-6, "{got:?} vs {expect:?}");
        }
    }

    #[test]
    fn routing_modes() {
        // probs of [0, ln 2, ln 3] = [1/6, 2/6, 3/6]
        let logits = [0.0, 2f32.ln(), 3f32.ln()];
        check(&logits, 1, Routing::Cephalo, &[(2, 1.0)]);
        check(&logits, 1, Routing::Renormalize, &[(2, 1.0)]);
        check(&logits, 2, Routing::Renormalize, &[(2, 0.6), (1, 0.4)]);
        // softmax over [0.5, 1/3]
        let (a, b) = ((0.5f32).exp(), (1.0f32 / 3.0).exp());
        check(
            &logits,
            2,
            Routing::Cephalo,
            &[(2, a / (a + b)), (1, b / (a + b))],
        );
        check(&[1.0, 1.0], 1, Routing::Cephalo, &[(0, 1.0)]);
    }
}
