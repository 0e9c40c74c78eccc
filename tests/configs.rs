//! Every shipped config parses, validates, builds its model, takes two training steps on a
//! slice of its data and writes a checkpoint that loads back.

use std::path::{Path, PathBuf};

use gentrain::config::Config;

fn configs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "toml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn shipped_configs_validate_and_train_two_steps() {
    let all = configs();
    assert!(
        all.len() >= 13,
        "expected the examples config and the 12 IWAE Table 1 configs, found {}",
        all.len()
    );
    for path in all {
        let name = path.display().to_string();
        let mut cfg = Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        // A slice of the data, no evaluation or pictures: only the step and the checkpoint.
        cfg.data.limit_train = 64;
        cfg.data.synthetic_size = cfg.data.synthetic_size.min(64);
        cfg.data.validation = 0;
        cfg.train.batch_size = 32;
        cfg.train.eval_every = 0;
        cfg.train.sample_every = 0;
        cfg.train.threads = 1;
        cfg.eval.final_k = 0;
        let tmp = tempfile::tempdir().unwrap();
        let opts = gentrain::train::TrainOptions {
            out: tmp.path().join("run"),
            resume: None,
            progress: false,
            max_steps: Some(2),
            handle_signals: false,
            parallel: None,
        };
        let s = gentrain::train::train(&cfg, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.steps, 2, "{name}");
        gentrain::session::load_checkpoint(&opts.out, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: checkpoint does not load: {e}"));
    }
}
