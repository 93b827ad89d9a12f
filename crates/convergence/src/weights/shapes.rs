//! A `VarBuilder` backend that hands out zero-stride tensors and records every (name, shape) it
//! was asked for: the real construction code then tells us a model's exact parameter list
//! without allocating a single weight.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::sync::{Arc, Mutex};

/// (name, shape) of every tensor a model asked for, in construction order.
#[derive(Clone, Debug, Default)]
pub struct ParamList(pub Vec<(String, Vec<usize>)>);

impl ParamList {
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum()
    }

    /// Parameters whose name starts with `prefix`.
    pub fn total_under(&self, prefix: &str) -> u64 {
        self.0
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }
}

type NamedShape = (String, Vec<usize>);

#[derive(Clone, Default)]
pub struct ShapeRecorder {
    seen: Arc<Mutex<Vec<NamedShape>>>,
}

impl ShapeRecorder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, Device::Cpu)
    }

    pub fn params(&self) -> ParamList {
        let mut seen = self.seen.lock().expect("recorder lock").clone();
        // A tensor fetched twice (shared weights) is one parameter.
        let mut names = std::collections::HashSet::new();
        seen.retain(|(n, _)| names.insert(n.clone()));
        ParamList(seen)
    }
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen.lock().expect("recorder lock").push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}
