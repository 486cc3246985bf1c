//! A studio light rig: scene and brightness in holding registers, set before a product photo.

use std::collections::BTreeMap;

use kiln_protocol::fleet::DeviceTask;
use serde_json::Value;

use super::{Done, Readings, TaskError};
use crate::config::LightsMap;
use crate::modbus::{Device, Op};

/// A light rig's driver.
pub struct Lights {
    modbus: Device,
    map: LightsMap,
}

impl Lights {
    pub(super) fn new(modbus: Device, map: LightsMap) -> Lights {
        Lights { modbus, map }
    }

    fn param(task: &DeviceTask, name: &str, max: u16) -> Result<Option<u16>, TaskError> {
        match task.params.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n <= max)
                .map(Some)
                .ok_or_else(|| TaskError::new(format!("params.{name}: {v} is not a whole number from 0 to {max}"))),
        }
    }

    pub(super) async fn run(&mut self, task: &DeviceTask) -> Result<Done, TaskError> {
        let scene = Self::param(task, "scene", u16::MAX)?;
        let brightness = Self::param(task, "brightness", self.map.max_brightness)?;
        if scene.is_none() && brightness.is_none() {
            return Err(TaskError::new("params: give scene, brightness or both"));
        }
        for (reg, value) in [(self.map.scene, scene), (self.map.brightness, brightness)] {
            if let Some(value) = value {
                self.modbus.call(Op::WriteRegister(reg, value)).await?;
                let back = self.modbus.read_one(reg).await?;
                if back != value {
                    return Err(TaskError::new(format!("register {reg} reads {back} after writing {value}")));
                }
            }
        }
        let scene = self.modbus.read_one(self.map.scene).await?;
        let brightness = self.modbus.read_one(self.map.brightness).await?;
        Ok(Done { detail: format!("scene {scene}, brightness {brightness}"), output_asset: None })
    }

    pub(super) async fn readings(&mut self) -> Readings {
        let mut r = BTreeMap::new();
        r.insert("scene".into(), Value::from(self.modbus.read_one(self.map.scene).await?));
        r.insert("brightness".into(), Value::from(self.modbus.read_one(self.map.brightness).await?));
        Ok(r)
    }
}
