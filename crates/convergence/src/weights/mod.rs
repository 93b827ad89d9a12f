//! How bytes become a `VarBuilder`: diffusers/transformers directories (sharded too), single
//! safetensors files and PyTorch pickles, memory-mapped where the format allows; every tensor is
//! checked for name, shape and dtype with an error that names the file. `keymap` converts the
//! original checkpoint layouts; `ShapeRecorder` builds a model without allocating its weights.

pub mod init;
pub mod keymap;
pub mod load;
mod shapes;

pub use load::{load_model, LoadOptions};
pub use shapes::{ParamList, ShapeRecorder};

use crate::error::{Error, Result};
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

enum Source {
    /// Index of the memory-mapped file that holds the tensor.
    Mapped(usize),
    /// Already in memory (pickles, remapped or derived tensors); the file it came from.
    Owned(Tensor, usize),
}

/// Named tensors from one or more files, fetched lazily and validated on every fetch.
pub struct WeightStore {
    files: Vec<PathBuf>,
    mapped: Vec<Option<MmapedSafetensors>>,
    entries: HashMap<String, Source>,
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
}

impl WeightStore {
    /// Memory-maps safetensors files (one model split over shards is several files).
    pub fn open_safetensors(paths: &[PathBuf]) -> Result<Self> {
        let mut store = WeightStore { files: vec![], mapped: vec![], entries: HashMap::new() };
        for path in paths {
            if !path.exists() {
                return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
            }
            // SAFETY: the file is mapped read-only; modifying it while we run is the user's error,
            // exactly as with every mmap-based loader (safetensors, PyTorch mmap=True).
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::Corrupt {
                path: path.clone(),
                format: "safetensors",
                reason: crate::error::Error::from(e).to_string(),
            })?;
            let idx = store.files.len();
            for (name, _) in st.tensors() {
                store.entries.insert(name, Source::Mapped(idx));
            }
            store.files.push(path.clone());
            store.mapped.push(Some(st));
        }
        Ok(store)
    }

    /// Reads a PyTorch pickle (`torch.save` zip or legacy) holding a state dict.
    pub fn open_pickle(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
        let corrupt =
            |reason: String| Error::Corrupt { path: path.to_path_buf(), format: "PyTorch pickle", reason };
        // Official checkpoints are plain state dicts; trainers often wrap them in "model"/"ema".
        let mut tensors =
            candle_core::pickle::read_all(path).map_err(|e| corrupt(Error::from(e).to_string()))?;
        if tensors.is_empty() {
            for key in ["ema", "model", "state_dict"] {
                if let Ok(t) = candle_core::pickle::read_all_with_key(path, Some(key)) {
                    if !t.is_empty() {
                        tensors = t;
                        break;
                    }
                }
            }
        }
        if tensors.is_empty() {
            return Err(corrupt("no tensors found".into()));
        }
        Ok(Self::from_tensors(tensors, path))
    }

    /// Opens a checkpoint file by extension (.safetensors, .pt/.pth/.bin/.ckpt).
    pub fn open_file(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => Self::open_safetensors(&[path.to_path_buf()]),
            Some("pt" | "pth" | "bin" | "ckpt") => Self::open_pickle(path),
            _ => Err(Error::config(
                path,
                "unknown checkpoint extension (expected .safetensors, .pt, .pth, .bin or .ckpt)",
            )),
        }
    }

    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>, origin: &Path) -> Self {
        WeightStore {
            files: vec![origin.to_path_buf()],
            mapped: vec![None],
            entries: tensors.into_iter().map(|(n, t)| (n, Source::Owned(t, 0))).collect(),
        }
    }

    /// The file (or, for sharded models, the first file) errors are reported against.
    pub fn origin(&self) -> &Path {
        &self.files[0]
    }

    fn file_of(&self, name: &str) -> &Path {
        match self.entries.get(name) {
            Some(Source::Mapped(i)) | Some(Source::Owned(_, i)) => &self.files[*i],
            None => self.origin(),
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The stored shape of a tensor, without loading it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self.entries.get(name)? {
            Source::Mapped(i) => self.mapped[*i].as_ref()?.get(name).ok().map(|v| v.shape().to_vec()),
            Source::Owned(t, _) => Some(t.dims().to_vec()),
        }
    }

    /// Loads one tensor as stored (its own dtype).
    pub fn load(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.origin().to_path_buf(),
            tensor: name.to_string(),
            expected: vec![],
        })?;
        match entry {
            Source::Owned(t, _) => Ok(t.to_device(dev)?),
            Source::Mapped(i) => {
                let st = self.mapped[*i].as_ref().expect("mapped entry has a mapping");
                let view = st.get(name)?;
                view.load(dev).map_err(|e| Error::Corrupt {
                    path: self.files[*i].clone(),
                    format: "safetensors",
                    reason: format!("tensor `{name}`: {}", Error::from(e)),
                })
            }
        }
    }

    /// Loads every tensor into memory (for key remapping of original layouts).
    pub fn load_all(&self, dev: &Device) -> Result<Vec<(String, Tensor)>> {
        self.names().into_iter().map(|n| Ok((n.clone(), self.load(&n, dev)?))).collect()
    }

    /// Fetches `name` checked against `shape` and converted to `dtype`.
    pub fn get_checked(&self, shape: &[usize], name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let path = self.file_of(name).to_path_buf();
        let found = self.shape(name).ok_or_else(|| Error::MissingTensor {
            path: path.clone(),
            tensor: name.to_string(),
            expected: shape.to_vec(),
        })?;
        if found != shape {
            return Err(Error::ShapeMismatch {
                path,
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        let t = self.load(name, dev)?;
        if !is_float(t.dtype()) {
            return Err(Error::DType { path, tensor: name.to_string(), found: format!("{:?}", t.dtype()) });
        }
        Ok(t.to_dtype(dtype)?)
    }

    /// A `VarBuilder` over this store, computing in `dtype` on `dev`.
    pub fn var_builder(self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, dev.clone())
    }
}

impl SimpleBackend for WeightStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Ok(self.get_checked(s.dims(), name, dtype, dev)?)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

/// The weight files of a diffusers (`diffusion_pytorch_model*.safetensors`) or transformers
/// (`model*.safetensors`) model directory, following a shard index when there is one.
pub fn model_dir_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for stem in ["diffusion_pytorch_model", "model"] {
        let single = dir.join(format!("{stem}.safetensors"));
        if single.exists() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.exists() {
            return shard_files(&index);
        }
    }
    Err(Error::config(
        dir,
        "no weights found (expected diffusion_pytorch_model.safetensors, model.safetensors or a .safetensors.index.json)",
    ))
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(index, format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index, "missing `weight_map`"))?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Reads and parses a JSON config file, naming the file in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, format!("invalid config: {e}")))
}

/// Reads a fixture-style tensor file (all tensors, in memory).
pub fn read_safetensors(path: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    let store = WeightStore::open_safetensors(&[path.to_path_buf()])?;
    Ok(store.load_all(dev)?.into_iter().collect())
}

/// Writes tensors to a safetensors file atomically (temp file + rename).
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp)
        .map_err(|e| Error::msg(format!("{}: {}", tmp.display(), Error::from(e))))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
