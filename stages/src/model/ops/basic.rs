//! Small ops that stay compositions of candle's basic ops (they touch (B, D)
//! tensors only, so a fused kernel would not pay).

use candle_core::{Result, Tensor};

/// LeakyReLU: `x` for `x >= 0`, `slope * x` otherwise.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    x.maximum(&zeros)? + (x.minimum(&zeros)? * slope)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn leaky_relu_values() -> Result<()> {
        let x = Tensor::new(&[-2f32, -0.5, 0.0, 3.0], &Device::Cpu)?;
        assert_eq!(leaky_relu(&x, 0.2)?.to_vec1::<f32>()?, vec![-0.4, -0.1, 0.0, 3.0]);
        Ok(())
    }
}
