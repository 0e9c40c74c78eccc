//! Data parallelism on the CPU: the sharding and averaging math against one process, with ranks
//! as threads ([`LocalGroup`]) and as processes started by `trainer launch` (TCP backend).
//!
//! The claim under test (see `gentrain::distributed`): with the same global batch, `W` ranks
//! apply the update one process applies, up to float reordering. The single-process run is the
//! reference; the updates are compared by relative error after several SGD steps, for
//! 1 and 2 stochastic layers, k = 1 and k = 5, world sizes 1 to 4 and global batches that do
//! not divide evenly (including a rank left with no rows).

mod common;

use std::sync::Arc;

use candle_core::Device;
use gentrain::config::Config;
use gentrain::data::images::{ImageSet, Split};
use gentrain::data::{Binarization, DataSource};
use gentrain::distributed::local::LocalGroup;
use gentrain::distributed::{Communicator, DataParallel};

fn mnist_subset(n: usize) -> DataSource {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    let mut set = ImageSet::load(&root, Split::Train).unwrap();
    set.truncate(n);
    DataSource::from_images(&set, Binarization::Dynamic, 7)
}

/// SGD without momentum: the update is linear in the gradient, so float reordering in the
/// all-reduce stays at rounding level (Adam's first steps, `m / sqrt(v)`, would turn the sign of
/// a near-zero gradient component into a full learning-rate step and hide real errors in noise).
fn config(layers: usize, k: usize) -> Config {
    let mut cfg = Config::default();
    cfg.optim.kind = gentrain::config::OptimizerKind::Sgd;
    cfg.optim.momentum = 0.0;
    cfg.objective.k = k;
    if k > 1 {
        cfg.objective.kind = gentrain::config::ObjectiveKind::Iwae;
    }
    cfg.model.layers.truncate(1);
    cfg.model.layers[0].hidden = vec![32];
    cfg.model.layers[0].latent = 6;
    if layers == 2 {
        let mut second = cfg.model.layers[0].clone();
        second.latent = 3;
        second.hidden = vec![16];
        cfg.model.layers.push(second);
    }
    cfg
}

/// Parameters after `steps` Adam steps on the global batches `batches`, trained by `world`
/// ranks (threads); every rank's parameters are returned.
fn train(
    cfg: &Config,
    data: &DataSource,
    batches: &[Vec<u32>],
    world: usize,
) -> Vec<Vec<Vec<f32>>> {
    let run = |parallel: Option<DataParallel>| -> Vec<Vec<f32>> {
        let dev = Device::Cpu;
        let model = gentrain::session::build_vae(cfg, data.dim(), &dev).unwrap();
        let mut opt = gentrain::optim::Optimizer::new(&cfg.optim, &model.store).unwrap();
        if let Some(p) = &parallel {
            p.broadcast_parameters(&model.store.vars()).unwrap();
        }
        for (step, idx) in batches.iter().enumerate() {
            let out = gentrain::train::train_step(
                &model,
                &mut opt,
                cfg,
                data,
                idx,
                step as u64,
                1.0,
                0.05,
                &dev,
                parallel.as_ref(),
                gentrain::rng::Draws::Host,
            )
            .unwrap();
            assert_eq!(out.applied, Some(true));
        }
        model
            .store
            .iter()
            .map(|(_, v)| common::flat_f32(v.as_tensor()))
            .collect()
    };
    if world == 0 {
        return vec![run(None)];
    }
    let group = LocalGroup::new(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| {
                let run = &run;
                // Small buckets, so that several all-reduce calls make up one step.
                s.spawn(move || {
                    run(Some(
                        DataParallel::new(Arc::new(c)).with_bucket_elements(500),
                    ))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The largest difference between the updates `a - start` and `b - start`, relative to the
/// largest entry of the update `b - start` (the update is what the group computes; comparing
/// parameters entry by entry would weigh rounding by the size of unrelated weights).
fn update_error(a: &[Vec<f32>], b: &[Vec<f32>], start: &[Vec<f32>]) -> f32 {
    let (mut diff, mut scale) = (0f32, 0f32);
    for ((x, y), s) in a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .zip(start.iter().flatten())
    {
        diff = diff.max(((x - s) - (y - s)).abs());
        scale = scale.max((y - s).abs());
    }
    diff / scale
}

#[test]
fn ranks_apply_the_single_process_update() {
    let data = mnist_subset(200);
    // Global batches of 24, 24 and a short last one of 7 (not divisible by 2, 3 or 4).
    let order = gentrain::rng::epoch_permutation(3, 0, 200);
    let batches: Vec<Vec<u32>> = vec![
        order[0..24].to_vec(),
        order[24..48].to_vec(),
        order[48..55].to_vec(),
    ];
    for (layers, k) in [(1, 1), (1, 5), (2, 5)] {
        let cfg = config(layers, k);
        let single = train(&cfg, &data, &batches, 0).remove(0);
        let start = train(&cfg, &data, &batches[..0], 0).remove(0);
        let moved = single
            .iter()
            .flatten()
            .zip(start.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(moved > 1e-2, "the steps must move the parameters ({moved})");
        // The short last batch matters: averaging its shards with equal weights (a common
        // mistake) moves the update by far more than the tolerance below.
        let first_two = train(&cfg, &data, &batches[..2], 0).remove(0);
        assert!(update_error(&first_two, &single, &start) > 1e-2);
        for world in 1..=4 {
            let ranks = train(&cfg, &data, &batches, world);
            for (r, p) in ranks.iter().enumerate() {
                // Every rank holds the same parameters, bit for bit.
                assert_eq!(
                    p, &ranks[0],
                    "layers {layers} k {k}: rank {r} of {world} diverged"
                );
            }
            let err = update_error(&ranks[0], &single, &start);
            assert!(
                err < 1e-4,
                "layers {layers} k {k} world {world}: relative difference {err:.2e} from one process"
            );
        }
    }
}

#[test]
fn averaging_is_the_global_mean_and_detects_a_wrong_weighting() {
    // Two ranks with 1 and 3 rows of a global batch of 4: the averaged gradient is
    // (1 g_0 + 3 g_1) / 4, not (g_0 + g_1) / 2.
    let group = LocalGroup::new(2);
    let got: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let rank = c.rank();
                    let p = DataParallel::new(Arc::new(c));
                    let v = candle_core::Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
                    let scale = if rank == 0 { 4.0 } else { 8.0 };
                    let loss = (v.as_tensor() * scale).unwrap().sum_all().unwrap();
                    let grads = loss.backward().unwrap();
                    let rows = if rank == 0 { 1 } else { 3 };
                    let avg = p
                        .average(std::slice::from_ref(&v), grads, &[loss], rows, 4)
                        .unwrap();
                    let mut out = avg
                        .grads
                        .get(v.as_tensor())
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    out.push(avg.scalars[0].to_scalar::<f32>().unwrap());
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // (1 * 4 + 3 * 8) / 4 = 7 for both entries; losses 12 and 24 -> (12 + 3 * 24) / 4 = 21.
    assert_eq!(got[0], vec![7.0, 7.0, 21.0]);
    assert_eq!(got[0], got[1]);
}

#[test]
fn launch_trains_over_tcp_like_one_process_and_only_rank_0_writes() {
    use common::{assert_success, checkpoint_metadata, latest_model, metrics_events};
    use common::{small_setup, train_ok};
    // 230 rows in global batches of 50: four full batches and a short one of 30 per epoch.
    let (dir, cfg) = small_setup(230, 40);
    let cfg = cfg.to_str().unwrap();
    let single = dir.path().join("single");
    train_ok(cfg, &["--out", single.to_str().unwrap(), "--json"]);
    let group = dir.path().join("group");
    let out = launch(
        3,
        &["--config", cfg, "--out", group.to_str().unwrap(), "--json"],
    );
    assert_success(&out);
    // Only rank 0 prints its summary.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with('{')).count(),
        1,
        "{stdout}"
    );
    let (a, b) = (latest_f32(&single), latest_f32(&group));
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs() / (1e-3 + x.abs()));
        }
    }
    // Two epochs of Adam (10 steps) from the same start: float reordering only.
    assert!(
        worst < 1e-3,
        "group vs one process: relative difference {worst:.2e}"
    );
    assert_eq!(
        checkpoint_metadata(&latest_model(&group))["world_size"],
        "3"
    );
    // One metrics file, written by rank 0, and no stray files from other ranks.
    let events = metrics_events(&group);
    assert_eq!(
        events.iter().filter(|e| e["event"] == "eval").count(),
        2,
        "{events:?}"
    );
}

#[test]
fn a_failing_rank_stops_the_group_with_a_clear_error() {
    use common::{assert_user_error, small_setup};
    // Rank arguments the launcher refuses.
    let out = launch(2, &["--rank", "1"]);
    assert_user_error(&out, "set by `trainer launch`");
    // Ranks that fail: a global batch smaller than the group.
    let (dir, cfg) = small_setup(230, 40);
    let out = launch(
        2,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--batch-size",
            "1",
            "--out",
            dir.path().join("g").to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("at least the world size 2"), "{stderr}");
    assert!(stderr.contains("failed"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!dir.path().join("g").join("latest").exists());
}

/// `trainer launch --processes N -- ARGS`.
fn launch(processes: usize, args: &[&str]) -> std::process::Output {
    let n = processes.to_string();
    let mut all = vec!["launch", "--processes", &n, "--"];
    all.extend(args);
    common::trainer(&all)
}

/// The model tensors of a run's latest checkpoint, by name.
fn latest_tensors(run: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    common::tensors(&common::latest_model(run))
}

#[test]
fn a_group_stopped_early_resumes_exactly_with_the_same_world_size() {
    use common::{assert_success, small_setup};
    let (dir, cfg) = small_setup(230, 40);
    let cfg = cfg.to_str().unwrap();
    let straight = dir.path().join("straight");
    let s = straight.to_str().unwrap();
    assert_success(&launch(2, &["--config", cfg, "--out", s]));
    let split = dir.path().join("split");
    let p = split.to_str().unwrap();
    // Stop after 3 of the 10 steps (mid-epoch), then resume the group from the checkpoint.
    assert_success(&launch(
        2,
        &["--config", cfg, "--out", p, "--max-steps", "3"],
    ));
    assert_success(&launch(2, &["--resume", p]));
    // Rank-order sums make a group deterministic: bit-identical to the straight run.
    assert_eq!(latest_tensors(&straight), latest_tensors(&split));
}

#[test]
fn a_group_of_one_matches_the_plain_run_bit_for_bit() {
    use common::{assert_success, small_setup, train_ok};
    let (dir, cfg) = small_setup(230, 40);
    let cfg = cfg.to_str().unwrap();
    let (plain, group) = (dir.path().join("plain"), dir.path().join("group"));
    train_ok(cfg, &["--out", plain.to_str().unwrap()]);
    assert_success(&launch(
        1,
        &[
            "--config",
            cfg,
            "--threads",
            "1",
            "--out",
            group.to_str().unwrap(),
        ],
    ));
    // Shard = the whole batch, weight 1, a sum over one rank: nothing may change.
    assert_eq!(latest_tensors(&plain), latest_tensors(&group));
}

#[test]
fn a_signal_to_the_launcher_stops_every_rank_at_a_checkpoint() {
    use common::{checkpoint_metadata, latest_model, metrics_events, send_signal};
    use common::{small_setup, spawn_trainer, wait_for_metrics};
    let (dir, cfg) = small_setup(230, 40);
    let run = dir.path().join("run");
    let child = spawn_trainer(
        &[
            "launch",
            "--processes",
            "2",
            "--",
            "--config",
            cfg.to_str().unwrap(),
            "--epochs",
            "100000",
            "--out",
            run.to_str().unwrap(),
        ],
        &[],
    );
    // Wait until training is under way (metrics are being written), then SIGTERM the launcher.
    wait_for_metrics(&run, 3, std::time::Duration::from_secs(120));
    send_signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let events = metrics_events(&run);
    assert!(
        events.iter().any(|e| e["event"] == "interrupted"),
        "{events:?}"
    );
    assert_eq!(checkpoint_metadata(&latest_model(&run))["world_size"], "2");
}

/// The (f32) tensors of a run's latest checkpoint, flattened, by name.
fn latest_f32(run: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    common::tensors_f32(&common::latest_model(run))
}

/// [`latest_f32`] without the spectral-norm vectors, values only.
fn latest_values(run: &std::path::Path) -> Vec<Vec<f32>> {
    latest_f32(run)
        .into_iter()
        .filter(|(n, _)| !n.ends_with("weight_u") && !n.ends_with("weight_v"))
        .map(|(_, v)| v)
        .collect()
}

#[test]
fn flows_gans_and_diffusion_models_train_data_parallel_like_one_process() {
    use common::assert_success;
    let dir = tempfile::tempdir().unwrap();
    // 98 rows in global batches of 48: the third batch has 2 rows, so one of 3 ranks gets none.
    let common = [
        "--batch-size",
        "48",
        "--set",
        "data.synthetic_size=98",
        "--set",
        "optim.kind=\"sgd\"",
        "--set",
        "optim.momentum=0.0",
        "--lr",
        "0.01",
        "--threads",
        "1",
    ];
    let cases: [(&str, &[&str]); 5] = [
        ("configs/realnvp-moons.toml", &[]),
        ("configs/ddpm-grid25.toml", &[]),
        (
            "configs/ddpm-grid25.toml",
            &["--set", "model.diffusion.variance=\"learned\""],
        ),
        ("configs/sngan-grid25.toml", &[]),
        (
            "configs/sngan-grid25.toml",
            &[
                "--set",
                "model.gan.loss=\"wgan_gp\"",
                "--set",
                "model.gan.n_critic=2",
            ],
        ),
    ];
    for (i, (config, extra)) in cases.iter().enumerate() {
        let run = |name: &str, steps: &str, launch: bool| -> std::path::PathBuf {
            let out = dir.path().join(format!("{i}-{name}"));
            let mut args: Vec<&str> = Vec::new();
            if launch {
                args.extend(["launch", "--processes", "3", "--"]);
            } else {
                args.push("train");
            }
            let o = out.to_str().unwrap().to_string();
            args.extend(["--config", config, "--out", &o, "--max-steps", steps]);
            args.extend(common);
            args.extend(extra.iter());
            assert_success(&common::trainer(&args));
            out
        };
        let start = latest_values(&run("start", "0", false));
        let single = latest_values(&run("single", "4", false));
        let group = latest_values(&run("group", "4", true));
        let err = update_error(&group, &single, &start);
        assert!(
            err < 1e-4,
            "{config} {extra:?}: update differs from one process by {err:.2e}"
        );
        let moved = single
            .iter()
            .flatten()
            .zip(start.iter().flatten())
            .any(|(a, b)| a != b);
        assert!(moved, "{config}: the steps must move the parameters");
    }
}
