//! `trainer eval` on a VAE: the effective sample size, the estimator's Monte-Carlo error, the
//! k-sweep (JSON, text and `--plot`), the naive prior-sampling estimator beside the importance
//! sampled one, and bad `--k-sweep` values as one-line errors.

mod common;
use common::{assert_success, assert_user_error, small_trained_run, stdout_json, trainer};

fn eval_json(run: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "eval",
        "--checkpoint",
        run,
        "--limit",
        "30",
        "--samples",
        "0",
    ];
    args.extend_from_slice(extra);
    args.push("--json");
    let out = trainer(&args);
    assert_success(&out);
    stdout_json(&out)
}

#[test]
fn eval_reports_ess_the_k_sweep_and_the_prior_estimate() {
    let (tmp, _cfg, run) = small_trained_run(600, 40, &["--epochs", "8"]);
    let r = run.to_str().unwrap();
    let plot = tmp.path().join("sweep.png");
    let is = eval_json(
        r,
        &[
            "--k",
            "200",
            "--k-sweep",
            "1,10,200",
            "--plot",
            plot.to_str().unwrap(),
        ],
    );
    assert_eq!(is["estimator"], "importance");
    let (k, ess_mean, ess_min) = (
        is["k"].as_f64().unwrap(),
        is["ess_mean"].as_f64().unwrap(),
        is["ess_min"].as_f64().unwrap(),
    );
    assert!(
        ess_min >= 1.0 && ess_min <= ess_mean && ess_mean <= k,
        "{is}"
    );
    let frac = is["ess_fraction"].as_f64().unwrap();
    assert!((frac - ess_mean / k).abs() < 1e-9);
    assert!(is["nll_mc_stderr"].as_f64().unwrap() > 0.0);
    let sweep = is["k_sweep"].as_array().unwrap();
    let ks: Vec<u64> = sweep.iter().map(|p| p["k"].as_u64().unwrap()).collect();
    assert_eq!(ks, [1, 10, 200]);
    let nll = |p: &serde_json::Value| p["nll"].as_f64().unwrap();
    // The last point is the estimate itself; the bound tightens from one draw to many.
    assert!((nll(&sweep[2]) - is["nll"].as_f64().unwrap()).abs() < 1e-9);
    assert!(nll(&sweep[0]) > nll(&sweep[2]), "{sweep:?}");
    let png = std::fs::read(&plot).expect("--plot writes the file");
    assert_eq!(&png[1..4], b"PNG");

    // The prior's estimate from the same number of draws is far worse, with a far smaller ESS.
    let prior = eval_json(r, &["--k", "200", "--estimator", "prior"]);
    assert_eq!(prior["estimator"], "prior");
    let gap = prior["nll"].as_f64().unwrap() - is["nll"].as_f64().unwrap();
    assert!(gap > 5.0, "prior {prior} vs importance {is}");
    assert!(prior["ess_mean"].as_f64().unwrap() < ess_mean);

    // The text output names both errors and the ESS.
    let out = trainer(&[
        "eval",
        "--checkpoint",
        r,
        "--limit",
        "30",
        "--samples",
        "0",
        "--k",
        "50",
    ]);
    assert_success(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "standard error over images",
        "Monte-Carlo error of the estimate at least",
        "effective sample size",
        "NLL by k (same draws): k=1 ",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }

    // One draw per image has no Monte-Carlo error to report (it printed 0.0).
    let one = eval_json(r, &["--k", "1"]);
    assert!(one["nll_mc_stderr"].is_null(), "{one}");
}

#[test]
fn k_sweep_points_outside_one_to_k_are_one_line_errors() {
    let (_tmp, _cfg, run) = small_trained_run(100, 20, &["--epochs", "1"]);
    let r = run.to_str().unwrap();
    for bad in ["0,10", "10,51", "10,5", "5,5"] {
        let out = trainer(&[
            "eval",
            "--checkpoint",
            r,
            "--k",
            "50",
            "--k-sweep",
            bad,
            "--samples",
            "0",
        ]);
        assert_user_error(&out, "--k-sweep");
    }
    // More test images than there are is refused rather than quietly cut to all of them.
    let out = trainer(&["eval", "--checkpoint", r, "--limit", "21", "--samples", "0"]);
    assert_user_error(&out, "--limit 21: the test set has only 20");
    let out = trainer(&["eval", "--checkpoint", r, "--estimator", "uniform"]);
    assert_user_error(&out, "uniform");
    // A diffusion model's flag on a VAE is refused, not ignored; so is a plot into nowhere.
    let out = trainer(&[
        "eval",
        "--checkpoint",
        r,
        "--t-draws",
        "4",
        "--samples",
        "0",
    ]);
    assert_user_error(&out, "--t-draws applies to diffusion models only");
    let out = trainer(&[
        "eval",
        "--checkpoint",
        r,
        "--plot",
        "/nonexistent/dir/k.png",
        "--samples",
        "0",
    ]);
    assert_user_error(&out, "--plot");
    // The plot is a PNG: another extension is refused rather than written as one.
    let out = trainer(&[
        "eval",
        "--checkpoint",
        r,
        "--plot",
        "k.svg",
        "--samples",
        "0",
    ]);
    assert_user_error(&out, "name it *.png");
}
