//! Fresh weights from a seed: a `VarBuilder` backend that creates each variable with its
//! initialisation rule from our own ChaCha stream (candle's CPU RNG cannot be seeded), and
//! registers it in a `VarMap` for training. Two runs with one seed start from identical weights.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;

struct SeededInit {
    varmap: VarMap,
    rng: Mutex<ChaCha8Rng>,
}

impl SeededInit {
    fn draw(&self, init: Init, n: usize) -> Vec<f32> {
        let mut rng = self.rng.lock().expect("init rng");
        match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform { lo, up } => (0..n).map(|_| rng.gen_range(lo..up) as f32).collect(),
            Init::Randn { mean, stdev } => {
                (0..n).map(|_| (mean + stdev * crate::noise::normal(&mut rng)) as f32).collect()
            }
            Init::Kaiming { .. } => {
                // Not used by our models (they pass explicit rules); fall back to N(0, 0.02).
                (0..n).map(|_| (0.02 * crate::noise::normal(&mut rng)) as f32).collect()
            }
        }
    }
}

impl SimpleBackend for SeededInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut vars = self.varmap.data().lock().expect("varmap lock");
        if let Some(v) = vars.get(name) {
            return Ok(v.as_tensor().clone());
        }
        let data = Tensor::from_vec(self.draw(init, s.elem_count()), s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&data)?;
        vars.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("seeded init: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("varmap lock").contains_key(name)
    }
}

/// A `VarBuilder` that fills `varmap` with freshly initialised variables drawn from `seed`.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, dtype: DType, dev: &Device) -> VarBuilder<'static> {
    let backend = SeededInit { varmap: varmap.clone(), rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)) };
    VarBuilder::from_backend(Box::new(backend), dtype, dev.clone())
}
