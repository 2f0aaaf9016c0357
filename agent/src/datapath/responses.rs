//! The `respond` action's responses in `RESPONSES` (rendered by `crate::respond`).

use agent_common::{respond::index, MAX_LISTENERS};
use aya::maps::{Array, MapData};

use super::{error::map_err, Datapath, DatapathError};
use crate::respond::{templates, ResponseConfig};

/// Why a listener's responses could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("listener {listener}: {message}")]
    Render { listener: u32, message: String },
}

impl Datapath {
    /// Writes listener `id`'s response to every verdict (the `respond` action's), rendered
    /// from `cfg`. The programs read them only for a listener whose action is `respond`.
    pub fn set_responses(&mut self, id: u32, cfg: &ResponseConfig) -> Result<(), ResponseError> {
        if id >= MAX_LISTENERS {
            return Err(DatapathError::Capacity {
                what: "listener",
                index: id,
                max: MAX_LISTENERS,
            }
            .into());
        }
        let rendered = templates(cfg).map_err(|message| ResponseError::Render {
            listener: id,
            message,
        })?;
        let map = self
            .ebpf
            .map_mut("RESPONSES")
            .ok_or(DatapathError::MissingMap("RESPONSES"))?;
        let mut responses: Array<&mut MapData, agent_common::respond::ResponseTemplate> =
            Array::try_from(map).map_err(map_err("RESPONSES"))?;
        for (verdict, t) in rendered {
            responses
                .set(index(id, verdict as u32), t, 0)
                .map_err(map_err("RESPONSES"))?;
        }
        Ok(())
    }
}
