//! `metatrain adapt`: a short meta-training run exports its initialisation, which is then adapted to a
//! user's CSV of examples from one new linear task; the predictions are written, scored where labelled,
//! and the score printed is the one the written predictions give. Bad inputs fail with a clear message.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use metatrain_tests::*;

/// A deterministic stream of values in [-1, 1) (the test's own data, independent of the trainer's).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
}

/// Writes `n` rows of y = 1.5·x1 − 0.7·x2 + 0.3 (+ small noise); the last `unlabelled` rows leave y empty.
fn write_csv(path: &Path, rng: &mut Lcg, n: usize, unlabelled: usize) {
    let mut s = String::from("x1,x2,y\n");
    for i in 0..n {
        let (x1, x2) = (2.0 * rng.next(), 2.0 * rng.next());
        let y = 1.5 * x1 - 0.7 * x2 + 0.3 + 0.05 * rng.next();
        if i + unlabelled >= n {
            s += &format!("{x1},{x2},\n");
        } else {
            s += &format!("{x1},{x2},{y}\n");
        }
    }
    std::fs::write(path, s).expect("write csv");
}

fn adapt(args: &[&str], dir: &Path) -> Output {
    Command::new(binary("metatrain")).arg("adapt").args(args).current_dir(dir).output().expect("run metatrain adapt")
}

#[test]
fn adapt_predicts_a_new_regression_task_from_a_csv_and_scores_it() {
    let dir = scratch("adapt-csv");
    let run = dir.join("run");
    let (status, _) = Proc::spawn(&mut noisy_linear_run(&run, 300, 1, 2), "train").finish(Duration::from_secs(300));
    assert!(status.success());
    let mut rng = Lcg(7);
    write_csv(&dir.join("support.csv"), &mut rng, 30, 0);
    write_csv(&dir.join("query.csv"), &mut rng, 23, 3);
    let params = run.join("params.safetensors");
    let o = adapt(
        &[
            "--params",
            params.to_str().unwrap(),
            "--support",
            "support.csv",
            "--query",
            "query.csv",
            "--out",
            "pred.csv",
        ],
        &dir,
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success());
    // "query MSE on 20 labelled rows: A before adaptation → B after"
    let line = stdout.lines().find(|l| l.starts_with("query MSE on 20 labelled rows")).expect("score line");
    let nums: Vec<f64> = line.split([' ', ':']).filter_map(|w| w.parse().ok()).collect();
    let (before, after) = (nums[1], nums[2]);
    assert!(after < 0.5 * before, "adaptation must help on the new task: {before} → {after}");
    // The written predictions: one row per query, y and error only where labelled, and they give the
    // printed score.
    let csv = std::fs::read_to_string(dir.join("pred.csv")).expect("predictions");
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(csv.lines().next(), Some("x1,x2,prediction,y,squared_error"));
    assert_eq!(rows.len(), 23);
    assert!(rows[20..].iter().all(|r| r[3].is_empty() && r[4].is_empty() && r[2].parse::<f64>().is_ok()));
    let mse: f64 =
        rows[..20].iter().map(|r| (r[2].parse::<f64>().unwrap() - r[3].parse::<f64>().unwrap()).powi(2)).sum::<f64>()
            / 20.0;
    assert!((mse - after).abs() <= 1e-4 * after.max(1e-3), "printed {after}, the written predictions give {mse}");

    // Clear refusals.
    std::fs::write(dir.join("no-y.csv"), "x1,x2\n0.1,0.2\n").unwrap();
    std::fs::write(dir.join("three.csv"), "x1,x2,x3,y\n0.1,0.2,0.3,1\n").unwrap();
    std::fs::write(dir.join("nan.csv"), "x1,x2,y\n0.1,NaN,1\n").unwrap();
    std::fs::write(dir.join("twice.csv"), "x1,y,y\n0.1,0.2,1\n").unwrap();
    std::fs::write(dir.join("huge.csv"), "x1,x2,y\n0.1,1e39,1\n").unwrap();
    std::fs::write(dir.join("commas.csv"), format!("x1,x2,y\n{}\n", ",".repeat(1 << 20))).unwrap();
    let p = params.to_str().unwrap();
    for (support, query, expect) in [
        ("no-y.csv", "query.csv", "no column named y"),
        ("three.csv", "query.csv", "the model takes 2"),
        ("nan.csv", "query.csv", "not a finite number"),
        ("twice.csv", "query.csv", "names column \"y\" twice"),
        ("huge.csv", "query.csv", "is beyond"),
        ("commas.csv", "query.csv", "more fields, the header has 3"),
        ("support.csv", "missing.csv", "cannot read"),
    ] {
        let o = adapt(&["--params", p, "--support", support, "--query", query], &dir);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(expect) && !err.contains("panicked"), "{support}/{query}: {err}");
    }
    // --out naming an input is refused, and the input survives.
    let before = std::fs::read(dir.join("support.csv")).unwrap();
    let o = adapt(&["--params", p, "--support", "support.csv", "--query", "query.csv", "--out", "support.csv"], &dir);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("is one of the inputs"));
    assert_eq!(std::fs::read(dir.join("support.csv")).unwrap(), before);
    // A spreadsheet's byte-order mark is not part of the first column's name.
    std::fs::write(dir.join("bom.csv"), [b"\xef\xbb\xbf".as_slice(), &before].concat()).unwrap();
    let o = adapt(&["--params", p, "--support", "bom.csv", "--query", "query.csv", "--out", "bom-pred.csv"], &dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = adapt(&["--params", "support.csv", "--support", "support.csv", "--query", "query.csv"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not a safetensors file"), "{err}");
}

/// Lays out Lake's run01 (held-out Omniglot characters, official PNGs) as image folders: `classes`
/// support classes with their one training image each, and their test images as labelled queries.
fn lake_folders(dir: &Path, classes: usize) {
    use std::io::Read;
    let zip_path = metatrain_common::datadir::omniglot_file_for_tests("all_runs.zip").expect("the Omniglot data");
    let mut z = zip::ZipArchive::new(std::fs::File::open(&zip_path).expect("all_runs.zip")).expect("zip");
    let mut read = |name: &str| {
        let mut v = Vec::new();
        z.by_name(name).expect(name).read_to_end(&mut v).expect("read");
        v
    };
    let labels = String::from_utf8(read("run01/class_labels.txt")).expect("utf8");
    let mut pairs: Vec<(String, String)> = labels
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(t, c)| (c.trim().to_string(), t.trim().to_string())))
        .collect();
    pairs.sort();
    for (train, test) in pairs.into_iter().take(classes) {
        let class = Path::new(&train).file_stem().unwrap().to_string_lossy().into_owned();
        for (sub, file, name) in [("support", &train, "train.png"), ("query", &test, "test.png")] {
            let d = dir.join(sub).join(&class);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(name), read(file)).unwrap();
        }
    }
}

#[test]
fn adapt_classifies_held_out_omniglot_characters_from_image_folders() {
    let dir = scratch("adapt-images");
    let run = dir.join("run");
    let mut train = Command::new(binary("metatrain"));
    train
        .args(["train", "--config"])
        .arg(root().join("configs/omniglot-5w1s.toml"))
        .args(["--steps", "10", "--set", "train.meta_batch=4", "--set", "eval.every=0", "--set", "eval.final_tasks=0"])
        .args(["--local-workers", "2", "--out"])
        .arg(&run);
    let (status, _) = Proc::spawn(&mut train, "train").finish(Duration::from_secs(300));
    assert!(status.success());
    let params = run.join("params.safetensors");
    let p = params.to_str().unwrap();
    lake_folders(&dir.join("five"), 5);
    let o = adapt(&["--params", p, "--support", "five/support", "--query", "five/query", "--out", "pred.csv"], &dir);
    let stdout = String::from_utf8_lossy(&o.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success());
    let csv = std::fs::read_to_string(dir.join("pred.csv")).expect("predictions");
    assert_eq!(csv.lines().next(), Some("file,prediction,confidence,label,correct"));
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| r[3].starts_with("class") && (r[4] == "true") == (r[1] == r[3])), "{csv}");
    let correct = rows.iter().filter(|r| r[4] == "true").count();
    let line = stdout.lines().find(|l| l.starts_with("query accuracy on 5 labelled images (5-way)")).expect("score");
    let printed: f64 = line.split("→ ").nth(1).and_then(|s| s.split('%').next()).and_then(|s| s.parse().ok()).unwrap();
    assert!((printed - 20.0 * correct as f64).abs() < 1e-6, "printed {printed}%, the CSV has {correct}/5 right");

    // Three classes: the head's first three outputs; unlabelled queries (directly in the folder).
    lake_folders(&dir.join("three"), 3);
    let flat = dir.join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    for (i, e) in std::fs::read_dir(dir.join("three/query")).unwrap().enumerate() {
        std::fs::copy(e.unwrap().path().join("test.png"), flat.join(format!("q{i}.png"))).unwrap();
    }
    let o = adapt(&["--params", p, "--support", "three/support", "--query", "flat", "--out", "flat.csv"], &dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("3 query images predicted (no labels: not scored)"));
    let csv = std::fs::read_to_string(dir.join("flat.csv")).unwrap();
    assert!(csv
        .lines()
        .skip(1)
        .all(|l| l.ends_with(",,") && l.split(',').nth(1).is_some_and(|c| c.starts_with("class"))));

    // Refusals: more classes than the model's N, a query class the support set lacks, a broken image.
    lake_folders(&dir.join("six"), 6);
    std::fs::create_dir_all(dir.join("stranger/classXX")).unwrap();
    std::fs::copy(flat.join("q0.png"), dir.join("stranger/classXX/a.png")).unwrap();
    std::fs::create_dir_all(dir.join("broken/class01")).unwrap();
    std::fs::write(dir.join("broken/class01/x.png"), b"not a png").unwrap();
    for (support, query, expect) in [
        ("six/support", "five/query", "takes 2 to 5"),
        ("five/support", "stranger", "names no support class"),
        ("five/support", "broken", "x.png"),
    ] {
        let o = adapt(&["--params", p, "--support", support, "--query", query], &dir);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(expect) && !err.contains("panicked"), "{support}/{query}: {err}");
    }
}
