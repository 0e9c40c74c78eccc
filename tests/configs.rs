//! Every shipped config parses, validates, builds its model and takes a training step.

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
fn shipped_configs_validate_and_train_one_step() {
    let all = configs();
    assert!(
        all.len() >= 13,
        "expected the examples config and the 12 IWAE Table 1 configs, found {}",
        all.len()
    );
    let data = gentrain::data::DataSource::from_real(vec![0.0; 4 * 784], 784, 0);
    for path in all {
        let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        cfg.validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let model = gentrain::session::build_model(&cfg, 784, &candle_core::Device::Cpu).unwrap();
        assert_eq!(
            gentrain::models::vae::parameter_count(&cfg.model, 784),
            Some(model.store.numel()),
            "{}",
            path.display()
        );
        let mut opt = gentrain::optim::Optimizer::new(&cfg.optim, &model.store).unwrap();
        let out = gentrain::train::train_step(
            &model,
            &mut opt,
            &cfg,
            &data,
            &[0, 1, 2, 3],
            0,
            1.0,
            1e-3,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let bound = out.bound.to_scalar::<f32>().unwrap();
        assert!(
            out.applied == Some(true) && bound < 0.0,
            "{}: {bound}",
            path.display()
        );
    }
}
