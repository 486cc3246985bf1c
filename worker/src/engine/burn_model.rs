//! The CPPN as a burn `Module`: the generic path, for any backend burn runs on.
//!
//! The fused evaluators are the fast way to run the built-in family; this module is the path
//! that loaded weights will take and the cross-check the fused paths are tested against.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor, TensorData};

use super::EngineError;
use super::cppn::{Act, Cppn, HIDDEN, INPUTS, SampleTile};

/// An MLP with per-layer activations and a sigmoid on the output: linear RGB in (0, 1).
#[derive(Module, Debug)]
pub struct CppnModule {
    layers: Vec<Linear>,
    #[module(skip)]
    acts: Vec<Act>,
}

fn linear(w: &[f32], b: &[f32], d_in: usize, d_out: usize, device: &Device) -> Linear {
    // Ours is [out][in]; burn's Linear weight is [in, out].
    let mut t = vec![0.0f32; d_in * d_out];
    for o in 0..d_out {
        for i in 0..d_in {
            t[i * d_out + o] = w[o * d_in + i];
        }
    }
    Linear {
        weight: Param::from_tensor(Tensor::<2>::from_data(TensorData::new(t, [d_in, d_out]), device)),
        bias: Some(Param::from_tensor(Tensor::<1>::from_data(TensorData::new(b[..d_out].to_vec(), [d_out]), device))),
    }
}

impl CppnModule {
    /// The module holding one CPPN instance's weights on `device`.
    pub fn from_cppn(c: &Cppn, device: &Device) -> Self {
        let mut layers = vec![linear(c.w0.as_flattened(), &c.b0, INPUTS, HIDDEN, device)];
        for (w, b) in c.wh.iter().zip(&c.bh) {
            layers.push(linear(w.as_flattened(), b, HIDDEN, HIDDEN, device));
        }
        layers.push(linear(&c.wo.as_flattened()[..3 * HIDDEN], &c.bo, HIDDEN, 3, device));
        CppnModule { layers, acts: c.acts.to_vec() }
    }

    /// `[samples, 11]` → `[samples, 3]`.
    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let mut x = input;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x); // [samples, 32] (or 3 after the last)
            if let Some(act) = self.acts.get(i) {
                x = match act {
                    Act::Tanh => x.tanh(),
                    Act::Sin => x.sin(),
                    Act::Gauss => x.square().neg().exp(),
                };
            }
        }
        sigmoid(x)
    }

    /// Evaluates a tile through burn on `device`, `chunk` samples per forward pass so memory
    /// stays bounded. Output as [`super::cppn::render_tile_cpu`]: 3 floats per sample.
    pub fn render_tile(
        &self,
        c: &Cppn,
        tile: &SampleTile,
        device: &Device,
        out: &mut [f32],
    ) -> Result<(), EngineError> {
        const CHUNK: usize = 1 << 16;
        let n = tile.len();
        let mut start = 0;
        while start < n {
            let end = (start + CHUNK).min(n);
            let mut input = Vec::with_capacity((end - start) * INPUTS);
            for i in start..end {
                let (xx, yy) = ((i % tile.w as usize) as u32, (i / tile.w as usize) as u32);
                input.extend(c.coords(tile.x0 + xx, tile.y0 + yy, tile.full_w, tile.full_h));
                input.extend(c.latent);
            }
            let x = Tensor::<2>::from_data(TensorData::new(input, [end - start, INPUTS]), device);
            let data = self
                .forward(x)
                .try_into_data()
                .map_err(|e| EngineError::Backend(format!("burn readback failed: {e:?}")))?;
            let values =
                data.as_slice::<f32>().map_err(|e| EngineError::Backend(format!("burn output is not f32: {e:?}")))?;
            out[start * 3..end * 3].copy_from_slice(values);
            start = end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cppn::{eval_reference, render_tile_cpu};
    use crate::engine::style::Style;

    #[test]
    fn the_burn_cpu_path_agrees_with_the_fused_path() {
        let c = Cppn::new(11, Style::from_prompt("mirror forest"));
        let device = Device::flex();
        let m = CppnModule::from_cppn(&c, &device);
        let tile = SampleTile { x0: 0, y0: 0, w: 40, h: 30, full_w: 40, full_h: 30 };
        let mut via_burn = vec![0.0; tile.len() * 3];
        m.render_tile(&c, &tile, &device, &mut via_burn).unwrap();
        let mut fused = vec![0.0; tile.len() * 3];
        render_tile_cpu(&c, &tile, 2, &mut fused);
        let worst = via_burn.iter().zip(&fused).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-4, "burn flex vs fused: max difference {worst}");
        let r = eval_reference(&c, 7, 9, 40, 30);
        let o = (9 * 40 + 7) * 3;
        assert!((via_burn[o] - r[0]).abs() < 1e-4);
    }
}
