//! LoRA meta-learning's frozen base model: a safetensors file with the model's tensors under their
//! layout names (e.g. a run's `params.safetensors`). [`parse_base`] checks it against the model
//! (names, shapes, f32, finite) without I/O; [`load_base`] reads the file. Both binaries load the base
//! this way: the coordinator to check it and record its SHA-256 in the run's config, each worker to
//! compute with it after checking the same hash.

use std::io::Read;
use std::path::Path;

use thiserror::Error;

use crate::layout::{sha256_hex, ModelSpec, ParamLayout};

/// Largest base file read (a 1B-parameter model in f32 is 4 GB).
pub const MAX_BASE_FILE: u64 = 8 << 30;

#[derive(Debug, Error)]
pub enum LoraError {
    #[error("cannot read the LoRA base {path}: {why}")]
    Read { path: String, why: String },
    #[error("the LoRA base {path} is larger than {MAX_BASE_FILE} bytes")]
    TooLarge { path: String },
    #[error("the LoRA base {path} (model.lora_base: the {model} model's tensors under their names): {why}")]
    Tensors { why: TensorsError, model: &'static str, path: String },
    #[error("the LoRA base {path} is not a regular file")]
    NotAFile { path: String },
    #[error("the LoRA base's SHA-256 is {got}, the run's config says {want}: another file than the coordinator's")]
    WrongHash { got: String, want: String },
}

/// Why a safetensors file does not hold a layout's tensors.
#[derive(Debug, Error, PartialEq)]
pub enum TensorsError {
    #[error("not a safetensors file: {0}")]
    Format(String),
    #[error("no tensor {0:?}")]
    Missing(String),
    #[error("{name} is {got}, expected F32 {want:?}")]
    Shape { name: String, got: String, want: Vec<usize> },
    #[error("{name}[{index}] is not finite")]
    NonFinite { name: String, index: usize },
}

/// The tensors of `layout`, by name, from safetensors bytes: each f32, of the layout's shape and finite
/// (other tensors in the file are ignored). Also reads `params.safetensors` for `metatrain adapt`.
pub fn parse_tensors(bytes: &[u8], layout: &ParamLayout) -> Result<Vec<Vec<f32>>, TensorsError> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| TensorsError::Format(e.to_string()))?;
    let mut tensors = Vec::new();
    for p in &layout.params {
        let view = st.tensor(&p.name).map_err(|_| TensorsError::Missing(p.name.clone()))?;
        if view.dtype() != safetensors::Dtype::F32 || view.shape() != p.shape.as_slice() {
            let got = format!("{:?} {:?}", view.dtype(), view.shape());
            return Err(TensorsError::Shape { name: p.name.clone(), got, want: p.shape.clone() });
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(TensorsError::NonFinite { name: p.name.clone(), index });
        }
        tensors.push(values);
    }
    Ok(tensors)
}

/// The base model's tensors (f32, layout order) and the SHA-256 of the file they came from.
#[derive(Clone, Debug)]
pub struct LoraBase {
    pub tensors: Vec<Vec<f32>>,
    pub sha256: String,
}

/// Checks and decodes a base file's bytes for `spec`'s model.
pub fn parse_base(bytes: &[u8], spec: &ModelSpec) -> Result<LoraBase, TensorsError> {
    let tensors = parse_tensors(bytes, &spec.layout())?;
    Ok(LoraBase { tensors, sha256: sha256_hex(bytes) })
}

/// Reads and checks the base at `path`; with `want_sha256`, refuses any other file.
pub fn load_base(path: &Path, spec: &ModelSpec, want_sha256: Option<&str>) -> Result<LoraBase, LoraError> {
    let shown = path.display().to_string();
    let read_err = |e: std::io::Error| LoraError::Read { path: shown.clone(), why: e.to_string() };
    // A device or a FIFO reports no length and would be read forever: regular files only, and never
    // more than the limit even if the file grows while it is read.
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(LoraError::NotAFile { path: shown });
    }
    if meta.len() > MAX_BASE_FILE {
        return Err(LoraError::TooLarge { path: shown });
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path).map_err(read_err)?.take(MAX_BASE_FILE + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > MAX_BASE_FILE {
        return Err(LoraError::TooLarge { path: shown });
    }
    let base =
        parse_base(&bytes, spec).map_err(|why| LoraError::Tensors { why, model: spec.kind.name(), path: shown })?;
    match want_sha256 {
        Some(want) if !want.eq_ignore_ascii_case(&base.sha256) => {
            Err(LoraError::WrongHash { got: base.sha256, want: want.to_string() })
        }
        _ => Ok(base),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelKind;
    use safetensors::tensor::{Dtype, TensorView};

    fn file(spec: &ModelSpec, edit: impl Fn(&str, &mut Vec<u8>, &mut Vec<usize>)) -> Vec<u8> {
        let params = spec.init_params(3);
        let layout = spec.layout();
        let mut owned = Vec::new();
        for (p, (off, len)) in layout.params.iter().zip(layout.ranges()) {
            let mut bytes: Vec<u8> = params[off..off + len].iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut shape = p.shape.clone();
            edit(&p.name, &mut bytes, &mut shape);
            owned.push((p.name.clone(), bytes, shape));
        }
        let views: Vec<(String, TensorView)> =
            owned.iter().map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
        safetensors::serialize(views, &None).unwrap()
    }

    #[test]
    fn a_base_is_checked_against_the_model() {
        let spec = ModelSpec { kind: ModelKind::Mlp, in_features: 1, outputs: 1 };
        let good = file(&spec, |_, _, _| {});
        let base = parse_base(&good, &spec).unwrap();
        assert_eq!(base.tensors.len(), 6);
        assert_eq!(base.tensors.concat(), spec.init_params(3));
        assert_eq!(base.sha256, sha256_hex(&good));
        let nan = file(&spec, |n, b, _| {
            if n == "layer2.bias" {
                b[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
        });
        let err = |r: Result<LoraBase, TensorsError>| r.expect_err("refused");
        assert!(matches!(err(parse_base(&nan, &spec)), TensorsError::NonFinite { index: 0, .. }));
        let other = ModelSpec { kind: ModelKind::MlpLn, in_features: 1, outputs: 1 };
        assert!(matches!(err(parse_base(&good, &other)), TensorsError::Missing(_) | TensorsError::Shape { .. }));
        let wide = ModelSpec { kind: ModelKind::Mlp, in_features: 2, outputs: 1 };
        assert!(matches!(err(parse_base(&good, &wide)), TensorsError::Shape { .. }));
        assert!(matches!(err(parse_base(b"nonsense", &spec)), TensorsError::Format(_)));
    }

    #[test]
    fn load_base_refuses_another_file_than_the_coordinators() {
        let spec = ModelSpec { kind: ModelKind::Mlp, in_features: 1, outputs: 1 };
        let dir = std::env::temp_dir().join(format!("metatrain-lora-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("base.safetensors");
        std::fs::write(&path, file(&spec, |_, _, _| {})).unwrap();
        let base = load_base(&path, &spec, None).unwrap();
        assert!(load_base(&path, &spec, Some(&base.sha256)).is_ok());
        let wrong = "0".repeat(64);
        assert!(matches!(load_base(&path, &spec, Some(&wrong)), Err(LoraError::WrongHash { .. })));
        assert!(matches!(load_base(&dir.join("missing"), &spec, None), Err(LoraError::Read { .. })));
        assert!(matches!(load_base(&dir, &spec, None), Err(LoraError::NotAFile { .. })));
        assert!(matches!(load_base(Path::new("/dev/zero"), &spec, None), Err(LoraError::NotAFile { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
