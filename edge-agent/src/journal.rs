//! The task journal: one synced file per task id, written before the task is acknowledged and
//! again at each step, so a task delivered twice (MQTT is at least once, and the scheduler resends
//! what it has not heard back on) is carried out once, and a task cut off by a crash is not
//! started again.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kiln_protocol::fleet::{DeviceTask, RejectReason, ReportState};
use serde::{Deserialize, Serialize};

use crate::spool::write_synced;

/// What the journal knows of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The task as it came.
    pub task: DeviceTask,
    /// The last state reached.
    pub state: ReportState,
    /// The last detail.
    pub detail: Option<String>,
    /// Why it was rejected, when it was (absent from records written before reasons).
    #[serde(default)]
    pub reason: Option<RejectReason>,
    /// An asset the task made.
    pub output_asset: Option<String>,
    /// When the state was reached, unix milliseconds.
    pub at_ms: i64,
}

/// A device's journal.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens (or creates) the journal in `dir`.
    pub fn open(dir: &Path) -> io::Result<Journal> {
        fs::create_dir_all(dir)?;
        Ok(Journal { dir: dir.to_path_buf() })
    }

    fn path(&self, task_id: &str) -> PathBuf {
        self.dir.join(format!("{task_id}.json"))
    }

    /// The record of a task, if it was ever taken in. An unreadable record counts as taken in
    /// (failed): a task the agent cannot prove it did not start is not started.
    pub fn get(&self, task_id: &str) -> io::Result<Option<Record>> {
        match fs::read(self.path(task_id)) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(io::Error::other)?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a task's record, synced.
    pub fn put(&self, record: &Record) -> io::Result<()> {
        let bytes = serde_json::to_vec(record).map_err(io::Error::other)?;
        write_synced(&self.dir, &format!("{}.json", record.task.task_id), &bytes)
    }

    /// Tasks taken in but not ended (accepted or running), oldest first.
    pub fn unfinished(&self) -> io::Result<Vec<Record>> {
        let mut out = Vec::new();
        for item in fs::read_dir(&self.dir)? {
            let path = item?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) if !r.state.is_terminal() => out.push(r),
                Ok(_) => {}
                Err(e) => tracing::error!(path = %path.display(), error = e, "an unreadable journal record"),
            }
        }
        out.sort_by_key(|r| r.at_ms);
        Ok(out)
    }

    /// Forgets ended tasks last touched before `before_ms`, and the oldest of the rest past
    /// `max_ended`; a task not ended is kept whatever its age. Returns how many went.
    pub fn prune(&self, before_ms: i64, max_ended: usize) -> io::Result<usize> {
        let mut ended = Vec::new();
        for item in fs::read_dir(&self.dir)? {
            let path = item?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let record = fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok());
            if let Some(r) = record.filter(|r| r.state.is_terminal()) {
                ended.push((r.at_ms, path));
            }
        }
        // Newest first: what is kept is the front, up to `max_ended` and younger than `before_ms`.
        ended.sort_by_key(|e| std::cmp::Reverse(e.0));
        let mut n = 0;
        for (i, (at_ms, path)) in ended.iter().enumerate() {
            if i >= max_ended || *at_ms < before_ms {
                fs::remove_file(path)?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::fleet::{FLEET_VERSION, TaskKind};

    fn task(id: &str) -> DeviceTask {
        DeviceTask {
            v: FLEET_VERSION,
            task_id: id.into(),
            kind: TaskKind::Lights,
            asset: None,
            params: Default::default(),
            deadline_ms: i64::MAX,
            sent_ms: None,
            mac: None,
        }
    }

    #[test]
    fn records_persist_and_unfinished_ones_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.get("t1").unwrap(), None);
        let mut r = Record {
            task: task("t1"),
            state: ReportState::Running,
            detail: None,
            reason: None,
            output_asset: None,
            at_ms: 10,
        };
        j.put(&r).unwrap();
        j.put(&Record { task: task("t2"), state: ReportState::Succeeded, at_ms: 5, ..r.clone() }).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.get("t1").unwrap().unwrap().state, ReportState::Running);
        assert_eq!(j.unfinished().unwrap().iter().map(|r| r.task.task_id.as_str()).collect::<Vec<_>>(), ["t1"]);
        r.state = ReportState::Failed;
        j.put(&r).unwrap();
        assert!(j.unfinished().unwrap().is_empty());
        assert_eq!(j.prune(8, 100).unwrap(), 1, "t2 ended before 8");
        assert!(j.get("t2").unwrap().is_none() && j.get("t1").unwrap().is_some());
    }

    #[test]
    fn past_its_count_the_oldest_ended_tasks_go_and_unended_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let r = |id: &str, state, at_ms| Record {
            task: task(id),
            state,
            detail: None,
            reason: None,
            output_asset: None,
            at_ms,
        };
        for i in 0..5 {
            j.put(&r(&format!("e{i}"), ReportState::Succeeded, 100 + i)).unwrap();
        }
        j.put(&r("old-but-running", ReportState::Running, 1)).unwrap();
        assert_eq!(j.prune(0, 2).unwrap(), 3);
        let kept: Vec<bool> = (0..5).map(|i| j.get(&format!("e{i}")).unwrap().is_some()).collect();
        assert_eq!(kept, [false, false, false, true, true], "the two newest stay");
        assert!(j.get("old-but-running").unwrap().is_some());
        assert_eq!(j.prune(0, 2).unwrap(), 0);
    }
}
