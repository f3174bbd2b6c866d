//! Checkpoints: a directory written atomically.
//!
//! Layout of `DIR`:
//! - `model.safetensors`: the trainable parameters by name (`backbone.*` with
//!   timm names, `draw.*`, `predictor.*`, `mask_token`), the fixed
//!   `backbone.pos_embed` (for export), and the EMA backbone under `ema.*`.
//! - `optim.safetensors`: AdamW moments `m.NAME`, `v.NAME`.
//! - `state.json`: [`TrainState`].
//!
//! Atomicity: everything is written into `.DIR.tmp` next to `DIR` (each file
//! fsynced), the old `DIR` is renamed to `.DIR.old`, the new one renamed into
//! place, and `.DIR.old` removed. A crash at any point leaves either `DIR` or
//! `.DIR.old` complete; [`resolve`] finds the one to load.

use super::TrainError;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIM_FILE: &str = "optim.safetensors";
pub const STATE_FILE: &str = "state.json";

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// Format version, 1.
    pub version: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch of the last batch trained on.
    pub epoch: u64,
    /// Batches consumed so far = the global index of the next batch to train on.
    pub data_position: u64,
    /// The run seed (noise z and every stage draw from it).
    pub run_seed: u64,
    /// [`config_hash`] of the model and train config; resume refuses another.
    pub config_hash: String,
    /// The last loss trained on, for humans.
    pub last_loss: Option<f64>,
}

/// FNV-1a (64 bit) of the JSON of the configs: stable across runs and platforms.
pub fn config_hash<T: Serialize>(config: &T) -> String {
    let json = serde_json::to_string(config).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in json.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf, TrainError> {
    let name = dir.file_name().ok_or_else(|| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        msg: "a checkpoint path needs a final directory name".into(),
    })?;
    Ok(dir.with_file_name(format!(".{}.{suffix}", name.to_string_lossy())))
}

fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), TrainError> {
    candle_core::safetensors::save(tensors, path).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))
}

/// Writes a checkpoint to `dir` atomically (see the module doc).
pub fn save(
    dir: &Path,
    model: &HashMap<String, Tensor>,
    optim: &HashMap<String, Tensor>,
    state: &TrainState,
) -> Result<(), TrainError> {
    let tmp = sibling(dir, "tmp")?;
    let old = sibling(dir, "old")?;
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    write_safetensors(&tmp.join(MODEL_FILE), model)?;
    write_safetensors(&tmp.join(OPTIM_FILE), optim)?;
    let state_path = tmp.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Checkpoint {
        path: state_path.clone(),
        msg: e.to_string(),
    })?;
    fs::write(&state_path, json).map_err(io_err(&state_path))?;
    fs::File::open(&state_path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&state_path))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    if dir.exists() {
        fs::rename(dir, &old).map_err(io_err(dir))?;
    }
    fs::rename(&tmp, dir).map_err(io_err(dir))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        // Make the renames durable; not every filesystem allows syncing a directory.
        let _ = fs::File::open(parent).and_then(|f| f.sync_all());
    }
    Ok(())
}

/// The complete checkpoint directory for `dir`: `dir` itself, or `.dir.old`
/// when a save was interrupted between its two renames.
pub fn resolve(dir: &Path) -> Result<PathBuf, TrainError> {
    if dir.join(STATE_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    let old = sibling(dir, "old")?;
    if old.join(STATE_FILE).is_file() {
        return Ok(old);
    }
    Err(TrainError::Checkpoint {
        path: dir.to_path_buf(),
        msg: format!("no {STATE_FILE}: not a checkpoint"),
    })
}

/// A loaded checkpoint.
pub struct Loaded {
    pub model: HashMap<String, Tensor>,
    pub optim: HashMap<String, Tensor>,
    pub state: TrainState,
}

/// Reads the checkpoint at `dir` (see [`resolve`]) onto `device`.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded, TrainError> {
    let dir = resolve(dir)?;
    let read = |name: &str| {
        let path = dir.join(name);
        candle_core::safetensors::load(&path, device).map_err(|e| TrainError::Checkpoint {
            path: path.clone(),
            msg: e.to_string(),
        })
    };
    let state_path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: state_path.clone(),
        msg: e.to_string(),
    })?;
    if state.version != 1 {
        return Err(TrainError::Checkpoint {
            path: state_path,
            msg: format!("unknown version {}", state.version),
        });
    }
    Ok(Loaded {
        model: read(MODEL_FILE)?,
        optim: read(OPTIM_FILE)?,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> TrainState {
        TrainState {
            version: 1,
            step,
            epoch: 0,
            data_position: step,
            run_seed: 1,
            config_hash: "h".into(),
            last_loss: None,
        }
    }

    #[test]
    fn save_replaces_and_an_interrupted_save_falls_back_to_old() -> Result<(), TrainError> {
        let tmp = tempfile::tempdir().map_err(io_err(Path::new("tempdir")))?;
        let dir = tmp.path().join("ckpt");
        let dev = Device::Cpu;
        let mut model = HashMap::new();
        model.insert("w".to_string(), Tensor::new(&[1f32, 2.0], &dev)?);
        save(&dir, &model, &HashMap::new(), &state(1))?;
        save(&dir, &model, &HashMap::new(), &state(2))?;
        assert_eq!(load(&dir, &dev)?.state.step, 2);
        assert_eq!(load(&dir, &dev)?.model["w"].to_vec1::<f32>()?, vec![1.0, 2.0]);
        // A crash between the two renames: only `.ckpt.old` is complete.
        fs::rename(&dir, sibling(&dir, "old")?).map_err(io_err(&dir))?;
        assert_eq!(resolve(&dir)?, sibling(&dir, "old")?);
        assert_eq!(load(&dir, &dev)?.state.step, 2);
        // Nothing at all is an error that names the path.
        let missing = tmp.path().join("nothing");
        let err = load(&missing, &dev).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("nothing") && err.contains("not a checkpoint"), "{err}");
        Ok(())
    }
}
