//! `metatrain-worker grad` against an f64 finite-difference oracle, through files only (as a user
//! checking our math would): the meta-gradient it writes is compared with central differences of the
//! adapted query loss, which the same command reports with `--loss-only` at perturbed parameters.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use metatrain_common::config::ModelKind;
use metatrain_common::layout::ModelSpec;
use metatrain_common::rng::{keyed_rng, normal};
use metatrain_tests::{binary, scratch};
use safetensors::tensor::{Dtype, TensorView};

fn write_f64(path: &Path, tensors: &[(String, Vec<usize>, Vec<f64>)]) {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.clone(), TensorView::new(Dtype::F64, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, &None, path).expect("write safetensors");
}

fn read_f64(path: &Path) -> HashMap<String, Vec<f64>> {
    let bytes = std::fs::read(path).expect("read output");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), Dtype::F64, "computed in the data's dtype");
            (name, t.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
        })
        .collect()
}

fn grad_cmd(dir: &Path, params: &Path, out: &Path, algo: &str, loss_only: bool) {
    let mut cmd = Command::new(binary("metatrain-worker"));
    cmd.args(["grad", "--model", "mlp-ln", "--algo", algo, "--inner-steps", "3", "--inner-lr", "0.02", "--clamp", "5"])
        .arg("--params")
        .arg(params)
        .arg("--data")
        .arg(dir.join("data.safetensors"))
        .arg("--out")
        .arg(out);
    if loss_only {
        cmd.arg("--loss-only");
    }
    let o = cmd.output().expect("run metatrain-worker grad");
    assert!(o.status.success(), "grad failed: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn grad_command_matches_finite_differences_in_f64() {
    let dir = scratch("grad-cli");
    let mut rng = keyed_rng(&[2024]);
    let mut randn = |n: usize, s: f64| (0..n).map(|_| s * normal(&mut rng)).collect::<Vec<f64>>();
    // One noisy linear task: support and query share (w, b), so adapting on the support helps the query.
    let (w, b) = ([1.5, -2.0], 0.7);
    let mut set = |n: usize| {
        let x = randn(2 * n, 1.0);
        let noise = randn(n, 0.1);
        let y: Vec<f64> = (0..n).map(|i| x[2 * i] * w[0] + x[2 * i + 1] * w[1] + b + noise[i]).collect();
        (x, y)
    };
    let (sx, sy) = set(12);
    let (qx, qy) = set(9);
    let data = vec![
        ("support_x".to_string(), vec![12, 2], sx),
        ("support_y".to_string(), vec![12], sy),
        ("query_x".to_string(), vec![9, 2], qx),
        ("query_y".to_string(), vec![9, 1], qy),
    ];
    write_f64(&dir.join("data.safetensors"), &data);
    let spec = ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 };
    let layout = spec.layout();
    // Initial parameters (f32 init) made f64 and perturbed so LayerNorm affine parameters are non-trivial.
    let init = spec.init_params(5);
    let theta: Vec<(String, Vec<usize>, Vec<f64>)> = layout
        .params
        .iter()
        .zip(layout.ranges())
        .map(|(p, (off, len))| {
            let noise = randn(len, 0.1);
            (
                p.name.clone(),
                p.shape.clone(),
                init[off..off + len].iter().zip(noise).map(|(a, b)| *a as f64 + b).collect(),
            )
        })
        .collect();
    let theta_path = dir.join("theta.safetensors");
    write_f64(&theta_path, &theta);
    grad_cmd(&dir, &theta_path, &dir.join("g.safetensors"), "maml", false);
    let g = read_f64(&dir.join("g.safetensors"));
    println!("query loss: before adaptation {:.4}, after {:.4}", g["pre_adapt_loss"][0], g["query_loss"][0]);
    assert!(
        g["query_loss"][0].is_finite() && g["query_loss"][0] < g["pre_adapt_loss"][0],
        "adaptation lowers the query loss"
    );

    let eps = 1e-6;
    let mut worst: f64 = 0.0;
    for d in 0..4 {
        let dirn: Vec<Vec<f64>> = theta.iter().map(|(_, _, v)| randn(v.len(), 1.0)).collect();
        let norm = dirn.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
        let shifted = |s: f64| -> f64 {
            let moved: Vec<_> = theta
                .iter()
                .zip(&dirn)
                .map(|((n, sh, v), dv)| {
                    (n.clone(), sh.clone(), v.iter().zip(dv).map(|(a, b)| a + s * b / norm).collect())
                })
                .collect();
            let p = dir.join(format!("theta-{d}-{s}.safetensors"));
            write_f64(&p, &moved);
            let o = dir.join(format!("loss-{d}-{s}.safetensors"));
            grad_cmd(&dir, &p, &o, "maml", true);
            read_f64(&o)["query_loss"][0]
        };
        let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
        let analytic: f64 = theta
            .iter()
            .zip(&dirn)
            .map(|((n, _, _), dv)| g[n].iter().zip(dv).map(|(a, b)| a * b / norm).sum::<f64>())
            .sum();
        let err = (analytic - fd).abs() / fd.abs().max(1e-3);
        println!("direction {d}: analytic {analytic:.9e}, finite difference {fd:.9e}, rel err {err:.2e}");
        worst = worst.max(err);
    }
    assert!(worst < 1e-6, "metatrain-worker grad disagrees with finite differences: {worst:e}");
}

/// Runs `grad` on `data` with parameters that do not exist, expecting a refusal; returns its stderr.
fn refused(dir: &Path, model: &str, steps: &str, data: &[(String, Vec<usize>, Vec<f64>)]) -> String {
    write_f64(&dir.join("data.safetensors"), data);
    let o = Command::new(binary("metatrain-worker"))
        .args(["grad", "--model", model, "--algo", "maml", "--inner-steps", steps, "--inner-lr", "0.1"])
        .arg("--params")
        .arg(dir.join("missing.safetensors"))
        .arg("--data")
        .arg(dir.join("data.safetensors"))
        .arg("--out")
        .arg(dir.join("g.safetensors"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "accepted: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn grad_command_refuses_bad_inputs_clearly() {
    let dir = scratch("grad-cli-bad");
    let err = refused(&dir, "mlp-ln", "1", &[("support_x".to_string(), vec![3, 2], vec![0.0; 6])]);
    assert!(err.contains("has no tensor named"), "names the missing tensor: {err}");
    let mut x = vec![0.5; 3];
    x[1] = f64::NAN;
    let err = refused(&dir, "mlp", "1", &[("support_x".to_string(), vec![3, 1], x)]);
    assert!(err.contains("support_x contains NaN or infinite values"), "{err}");
    let err = refused(&dir, "mlp", "1000000", &[("support_x".to_string(), vec![3, 1], vec![0.5; 3])]);
    assert!(err.contains("--inner-steps must be at most 1000"), "{err}");
    // --out naming an input (here the data file the calls above wrote) is refused before anything runs.
    let data = dir.join("data.safetensors");
    let o = Command::new(binary("metatrain-worker"))
        .args(["grad", "--model", "mlp", "--algo", "maml", "--inner-steps", "1", "--inner-lr", "0.1", "--params"])
        .arg(dir.join("missing.safetensors"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.join(".").join("data.safetensors"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("would overwrite an input"), "{err}");
    assert!(data.exists());
}
