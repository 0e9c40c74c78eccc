//! Named, ordered parameters. Names are PyTorch `state_dict` keys (`encoders.0.net.0.weight`),
//! built with `pp`-style prefixes as candle-nn's `VarBuilder` does; unlike a hash
//! map the order is the creation order, so checkpoints and optimizer state are deterministic.
//!
//! Initialization matches PyTorch's `nn.Linear.reset_parameters`: weight and bias drawn from
//! `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` (kaiming-uniform with `a = sqrt(5)`).

use candle_core::{Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// An ordered collection of named trainable tensors.
#[derive(Debug, Clone)]
pub struct ParamStore {
    params: Vec<(String, Var)>,
    device: Device,
}

impl ParamStore {
    /// An empty store on `device`.
    pub fn new(device: Device) -> Self {
        ParamStore {
            params: Vec::new(),
            device,
        }
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Creates a parameter drawn from `U(-bound, bound)`.
    pub fn uniform(
        &mut self,
        name: String,
        shape: &[usize],
        bound: f32,
        rng: &mut ChaCha8Rng,
    ) -> Result<Tensor> {
        if !bound.is_finite() || bound <= 0.0 {
            return Err(crate::error::Error::Config(format!(
                "{name}: initialization bound {bound} (a layer with no inputs?)"
            )));
        }
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..=bound)).collect();
        let var = Var::from_tensor(&Tensor::from_vec(v, shape, &self.device)?)?;
        let t = var.as_tensor().clone();
        self.params.push((name, var));
        Ok(t)
    }

    /// Creates a parameter of zeros.
    pub fn zeros(&mut self, name: String, shape: &[usize]) -> Result<Tensor> {
        let t = Tensor::zeros(shape, candle_core::DType::F32, &self.device)?;
        self.push(name, Var::from_tensor(&t)?)
    }

    /// Sets the value of the parameter `name` (same shape), in place: every tensor handed out
    /// for it sees the new value.
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let (_, var) = self
            .params
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| crate::error::Error::Config(format!("no parameter named {name}")))?;
        var.set(&value.to_device(&self.device)?)?;
        Ok(())
    }

    /// Adds a parameter; returns its tensor (which shares the variable's storage).
    pub(crate) fn push(&mut self, name: String, var: Var) -> Result<Tensor> {
        let t = var.as_tensor().clone();
        self.params.push((name, var));
        Ok(t)
    }

    /// Parameters created so far (the position the next one gets).
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// True when there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// The parameters' tensors in creation order (they share the variables' storage, so they
    /// see every update, and autograd tracks them).
    pub fn tensors(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect()
    }

    /// Detached tensors of the current values in creation order (no autograd graph is built on
    /// them: for sampling and evaluation).
    pub fn detached_tensors(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|(_, v)| v.as_tensor().detach())
            .collect()
    }

    /// A store of new variables with the same names, holding copies of the current values
    /// (an exponential moving average starts as such a copy).
    pub fn deep_copy(&self) -> Result<ParamStore> {
        let params = self
            .params
            .iter()
            .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ParamStore {
            params,
            device: self.device.clone(),
        })
    }

    /// Parameters in creation order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// The variables, in creation order (what a data-parallel group broadcasts and averages).
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|(_, v)| v.clone()).collect()
    }

    /// The parameters' current values under their names, in creation order (for checkpoints).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Replaces every parameter's value with the tensor of the same name from `source`; every
    /// name must be present with the same shape.
    pub fn load_from(
        &self,
        mut lookup: impl FnMut(&str, &[usize]) -> std::result::Result<Tensor, String>,
    ) -> std::result::Result<(), String> {
        for (name, var) in &self.params {
            let t = lookup(name, var.dims())?;
            var.set(&t.to_device(&self.device).map_err(|e| e.to_string())?)
                .map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    }
}
