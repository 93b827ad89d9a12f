//! Shared helpers for the reference-fixture tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(case)
}

pub fn io(case: &str) -> HashMap<String, Tensor> {
    convergence::weights::read_safetensors(&fixture(case).join("io.safetensors"), &Device::Cpu)
        .expect("fixture io")
}

/// Asserts |a - b| <= atol + rtol |b| elementwise, reporting the worst element.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let a = a.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst = (0usize, 0f32);
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        assert!(!x.is_nan(), "{what}: NaN at {i}");
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{what}: element {} differs: {} vs {} (atol {atol}, rtol {rtol})",
        worst.0,
        a[worst.0],
        b[worst.0]
    );
}
