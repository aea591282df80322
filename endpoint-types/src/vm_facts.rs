//! Uptime, load and disk use of an SSH VM, read by the steady-state probe as the steady-state
//! phase's user (`[resource.phases.steady-state] user`). Sans-IO: the fixed command the probe
//! runs and the parser of what it prints. Only numbers are kept (and the configured paths):
//! nothing of the output's text goes into a snapshot. Linux VMs (`/proc`) with POSIX `df -P`.

use serde::{Deserialize, Serialize};

/// The most disk paths a snapshot reports.
pub const MAX_DISK_PATHS: usize = 16;
/// The longest disk path accepted in `agent.toml`.
pub const MAX_DISK_PATH_LEN: usize = 200;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmFacts {
    pub uptime_s: u64,
    pub load_1m: f64,
    pub load_5m: f64,
    pub load_15m: f64,
    #[serde(default)]
    pub disks: Vec<DiskUse>,
}

/// `df -Pk PATH`: the file system holding `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUse {
    pub path: String,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
}

/// Why a disk path is refused in `agent.toml` (`[steady_state] disk_paths`).
pub fn check_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("disk_paths: {p:?} is not an absolute path"));
    }
    if p.len() > MAX_DISK_PATH_LEN || p.chars().any(|c| c.is_control() || c == '\'') {
        return Err(format!(
            "disk_paths: {p:?} must be at most {MAX_DISK_PATH_LEN} characters, without quotes or control characters"
        ));
    }
    Ok(())
}

/// The one command the probe runs: read-only, fixed but for the configured paths, each
/// single-quoted (paths with `'` are refused by [`check_path`]).
pub fn remote_command(paths: &[String]) -> String {
    let mut cmd = String::from("cat /proc/uptime /proc/loadavg");
    if !paths.is_empty() {
        cmd.push_str(" && df -Pk --");
        for p in paths.iter().take(MAX_DISK_PATHS) {
            cmd.push_str(" '");
            cmd.push_str(p);
            cmd.push('\'');
        }
    }
    cmd
}

fn number<T: std::str::FromStr>(s: Option<&str>, what: &str) -> Result<T, String> {
    s.and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("cannot read {what}"))
}

/// Parses what [`remote_command`] printed: `/proc/uptime`, `/proc/loadavg`, then `df -Pk`'s
/// header and one row per path, in the order given.
pub fn parse(stdout: &str, paths: &[String]) -> Result<VmFacts, String> {
    let mut lines = stdout.lines();
    let uptime = lines.next().unwrap_or_default();
    let uptime_s: f64 = number(uptime.split_whitespace().next(), "the uptime")?;
    let mut load = lines.next().unwrap_or_default().split_whitespace();
    let load_1m = number(load.next(), "the load")?;
    let load_5m = number(load.next(), "the load")?;
    let load_15m = number(load.next(), "the load")?;
    let mut disks = Vec::new();
    let paths = paths
        .get(..paths.len().min(MAX_DISK_PATHS))
        .unwrap_or_default();
    if !paths.is_empty() {
        // The header, then a row per path.
        let _header = lines.next();
        for (path, row) in paths.iter().zip(lines) {
            disks.push(df_row(path, row)?);
        }
        if disks.len() < paths.len() {
            return Err("df printed fewer rows than paths".into());
        }
    }
    Ok(VmFacts {
        uptime_s: uptime_s.max(0.0) as u64,
        load_1m,
        load_5m,
        load_15m,
        disks,
    })
}

/// `FS 1024-blocks Used Available Capacity% Mount`: the first run of three numbers and a
/// percentage (a file system name may hold spaces, the mount point too).
fn df_row(path: &str, row: &str) -> Result<DiskUse, String> {
    let fields: Vec<&str> = row.split_whitespace().collect();
    let found = fields.windows(4).find_map(|w| match w {
        [size, used, avail, pct] if pct.ends_with('%') => Some((
            size.parse::<u64>().ok()?,
            used.parse::<u64>().ok()?,
            avail.parse::<u64>().ok()?,
        )),
        _ => None,
    });
    let (size, used, avail) = found.ok_or_else(|| format!("cannot read df's row for {path:?}"))?;
    Ok(DiskUse {
        path: path.to_string(),
        size_bytes: size.saturating_mul(1024),
        used_bytes: used.saturating_mul(1024),
        available_bytes: avail.saturating_mul(1024),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_uptime_load_and_disks_in_path_order() {
        let out = "350735.47 234388.90\n0.15 0.21 0.30 1/123 4567\n\
            Filesystem     1024-blocks     Used Available Capacity Mounted on\n\
            /dev/vda1        258048000 81234567 176813433      32% /\n\
            my disk           1000       250       750      25% /var/lib my data\n";
        let paths = vec!["/".to_string(), "/var/lib/my data/x".to_string()];
        let f = parse(out, &paths).unwrap();
        assert_eq!(f.uptime_s, 350_735);
        assert_eq!((f.load_1m, f.load_5m, f.load_15m), (0.15, 0.21, 0.30));
        assert_eq!(f.disks.len(), 2);
        assert_eq!(f.disks[0].size_bytes, 258_048_000 * 1024);
        assert_eq!(f.disks[1].path, "/var/lib/my data/x");
        assert_eq!(f.disks[1].used_bytes, 250 * 1024);
        // No paths: no df at all.
        let f = parse("1.0 2.0\n0 0 0 1/1 1\n", &[]).unwrap();
        assert!(f.disks.is_empty());
        assert_eq!(remote_command(&[]), "cat /proc/uptime /proc/loadavg");
    }

    #[test]
    fn garbage_is_an_error_and_paths_are_quoted() {
        assert!(parse("", &[]).is_err());
        assert!(parse("up\n", &[]).is_err());
        assert!(parse("1 2\n0 0 0\nheader\n", &["/".into()]).is_err());
        assert!(parse("1 2\n0 0 0\nheader\nfs x y z 5% /\n", &["/".into()]).is_err());
        assert_eq!(
            remote_command(&["/".into(), "/var/a b".into()]),
            "cat /proc/uptime /proc/loadavg && df -Pk -- '/' '/var/a b'"
        );
        assert!(check_path("var").is_err());
        assert!(check_path("/a'b").is_err());
        assert!(check_path("/a\nb").is_err());
        assert!(check_path("/srv/data").is_ok());
    }
}
