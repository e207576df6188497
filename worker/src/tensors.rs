//! Conversions between the wire's flat vectors / task data and libtorch tensors.

use metatrain_common::layout::ParamLayout;
use metatrain_common::task::{Examples, Targets, TaskData};
use tch::{Kind, Tensor};

use crate::algo::TaskTensors;
use crate::model::TargetTensor;

/// Splits a flat parameter vector into one tensor per layout entry, in `kind` (Float or Double).
pub fn params_from_flat(layout: &ParamLayout, flat: &[f32], kind: Kind) -> Vec<Tensor> {
    layout
        .params
        .iter()
        .zip(layout.ranges())
        .map(|(p, (off, len))| {
            let shape: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
            Tensor::from_slice(&flat[off..off + len]).reshape(&shape).to_kind(kind)
        })
        .collect()
}

/// Concatenates per-parameter tensors (e.g. a meta-gradient) into one flat f32 vector in layout order.
pub fn flat_from_tensors(tensors: &[Tensor]) -> Result<Vec<f32>, tch::TchError> {
    let flat = Tensor::cat(&tensors.iter().map(|t| t.detach().flatten(0, -1)).collect::<Vec<_>>(), 0)
        .to_kind(Kind::Float)
        .contiguous();
    Vec::<f32>::try_from(&flat)
}

fn examples(e: &Examples, kind: Kind) -> (Tensor, TargetTensor) {
    let n = e.len() as i64;
    let mut shape = vec![n];
    shape.extend(e.feature_shape.iter().map(|&d| d as i64));
    let x = Tensor::from_slice(&e.x).reshape(&shape).to_kind(kind);
    let y = match &e.y {
        Targets::Real(v) => TargetTensor::Real(Tensor::from_slice(v).reshape([n, 1]).to_kind(kind)),
        Targets::Class(v) => TargetTensor::Class(Tensor::from_slice(v)),
    };
    (x, y)
}

/// A task's support and query sets as tensors in `kind`.
pub fn task_tensors(data: &TaskData, kind: Kind) -> TaskTensors {
    let (support_x, support_y) = examples(&data.support, kind);
    let (query_x, query_y) = examples(&data.query, kind);
    TaskTensors { support_x, support_y, query_x, query_y }
}
