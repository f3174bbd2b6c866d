//! Weighted k-nearest-neighbour classifier on cosine similarity (DINO's
//! `eval_knn.py` `knn_classifier`, after InstDisc).
//!
//! Features are L2-normalized; for each test row the k training rows of
//! highest cosine similarity s vote for their class with weight exp(s / T);
//! the class with the largest summed weight wins (ties: the lower class index).
//! Defaults k = 20, T = 0.07 as DINO. Test rows go through in chunks so the
//! similarity matrix stays `chunk x train` in memory.

use super::Features;
use candle_core::{DType, Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// The `eval.knn` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Neighbours that vote.
    pub k: usize,
    /// Temperature of the vote weights exp(s / T).
    pub temperature: f64,
    /// Test rows per similarity matmul.
    pub chunk: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            k: 20,
            temperature: 0.07,
            chunk: 256,
        }
    }
}

impl Config {
    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.k == 0 || self.chunk == 0 {
            return Err("eval.knn.k and eval.knn.chunk must be positive".into());
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(format!("eval.knn.temperature {} must be positive", self.temperature));
        }
        Ok(())
    }
}

/// Rows scaled to unit L2 norm (zero rows stay zero), (n, D).
fn normalized(f: &Features, device: &Device) -> Result<Tensor> {
    let x = Tensor::from_slice(&f.values, (f.len(), f.dim), device)?;
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    x.broadcast_div(&norm)
}

/// The k largest similarities of one row, (index, similarity), highest first;
/// equal similarities in index order.
fn top_k(sims: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..sims.len()).collect();
    let by_sim = |a: &usize, b: &usize| sims[*b].total_cmp(&sims[*a]).then(a.cmp(b));
    let k = k.min(idx.len());
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_sim);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_sim);
    idx.into_iter().map(|i| (i, sims[i])).collect()
}

/// The weighted vote of neighbours (index, similarity) over `classes`.
fn vote(neighbours: &[(usize, f32)], labels: &[usize], classes: usize, temperature: f64) -> usize {
    let mut weight = vec![0f64; classes];
    for &(i, s) in neighbours {
        weight[labels[i]] += (s as f64 / temperature).exp();
    }
    let mut best = 0;
    for (c, w) in weight.iter().enumerate() {
        if *w > weight[best] {
            best = c;
        }
    }
    best
}

/// The predicted class of each test row.
pub fn predict(cfg: &Config, train: &Features, test: &Features, device: &Device) -> Result<Vec<usize>> {
    if let Err(e) = train
        .check("kNN training features")
        .and(test.check("kNN test features"))
        .and(cfg.validate())
    {
        candle_core::bail!("{e}")
    }
    if train.dim != test.dim {
        candle_core::bail!("kNN: train features have {} values, test {}", train.dim, test.dim)
    }
    let classes = super::num_classes(train, test);
    let train_t = normalized(train, device)?.t()?.contiguous()?; // (D, n_train)
    let test_n = normalized(test, device)?;
    let mut out = Vec::with_capacity(test.len());
    for start in (0..test.len()).step_by(cfg.chunk) {
        let rows = (test.len() - start).min(cfg.chunk);
        let sims = test_n.narrow(0, start, rows)?.matmul(&train_t)?.to_dtype(DType::F32)?;
        for row in sims.to_vec2::<f32>()? {
            out.push(vote(&top_k(&row, cfg.k), &train.labels, classes, cfg.temperature));
        }
    }
    Ok(out)
}

/// Top-1 of [`predict`] on `test`.
pub fn evaluate(cfg: &Config, train: &Features, test: &Features, device: &Device) -> Result<f64> {
    Ok(super::top1(&predict(cfg, train, test, device)?, &test.labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn features(rows: Vec<Vec<f32>>, labels: Vec<usize>) -> Features {
        Features {
            dim: rows[0].len(),
            values: rows.concat(),
            labels,
        }
    }

    #[test]
    fn one_hot_label_features_give_100_percent() -> Result<()> {
        let classes = 7;
        let make = |n: usize, shift: usize| {
            let labels: Vec<usize> = (0..n).map(|i| (i * 3 + shift) % classes).collect();
            let rows = labels
                .iter()
                .map(|&l| (0..classes).map(|c| if c == l { 2.5 } else { 0.0 }).collect())
                .collect();
            features(rows, labels)
        };
        // Fewer than k = 20 training rows per class: the other classes' rows
        // (similarity 0) vote too, with weight 1 against exp(1 / 0.07).
        let (train, test) = (make(70, 0), make(50, 1));
        assert_eq!(evaluate(&Config::default(), &train, &test, &Device::Cpu)?, 1.0);
        Ok(())
    }

    /// The DINO recipe written out independently: f64 cosine similarity,
    /// full sort, weights exp(s / T), argmax.
    fn reference(cfg: &Config, train: &Features, test: &Features, classes: usize) -> Vec<usize> {
        let norm = |r: &[f32]| -> Vec<f64> {
            let n = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            r.iter().map(|v| *v as f64 / n).collect()
        };
        let train_rows: Vec<Vec<f64>> = train.values.chunks(train.dim).map(norm).collect();
        test.values
            .chunks(test.dim)
            .map(norm)
            .map(|q| {
                let mut sims: Vec<(f64, usize)> = train_rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (r.iter().zip(&q).map(|(a, b)| a * b).sum(), i))
                    .collect();
                sims.sort_by(|a, b| b.0.total_cmp(&a.0));
                let mut w = vec![0f64; classes];
                for (s, i) in sims.iter().take(cfg.k) {
                    w[train.labels[*i]] += (s / cfg.temperature).exp();
                }
                (0..classes).fold(0, |best, c| if w[c] > w[best] { c } else { best })
            })
            .collect()
    }

    #[test]
    fn matches_an_independent_computation_on_random_features() -> Result<()> {
        let mut rng = shards::rng::stage_rng(5, 0, "knn", "test");
        let mut random = |n: usize| {
            let rows: Vec<Vec<f32>> = (0..n)
                .map(|_| (0..12).map(|_| rng.random_range(-1.0..1.0)).collect())
                .collect();
            let labels = (0..n).map(|i| i % 4).collect();
            features(rows, labels)
        };
        let (train, test) = (random(300), random(97));
        let cfg = Config {
            chunk: 10,
            ..Config::default()
        };
        let got = predict(&cfg, &train, &test, &Device::Cpu)?;
        assert_eq!(got, reference(&cfg, &train, &test, 4));
        // Not trivially constant.
        assert!(got.iter().any(|&p| p != got[0]));
        Ok(())
    }

    #[test]
    fn top_k_keeps_the_largest_in_order() {
        assert_eq!(
            top_k(&[0.1, 0.9, 0.5, 0.9, -1.0], 3),
            vec![(1, 0.9), (3, 0.9), (2, 0.5)]
        );
        assert_eq!(top_k(&[0.3], 5), vec![(0, 0.3)]);
    }
}
