//! `ebb-collector import idcfrc PATH`: an ssh_scale.py `.idcfrc` (seeds 000/001) turned into an ebb
//! configuration for the same group, printed for the operator to review and save. What changes in meaning
//! is said separately, for stderr.
//!
//! ssh_scale.py ran from cron each minute, logged in over SSH to one monitored VM, and added one VM from the
//! template when that VM's load average was above `[scaling_policy_out] threshold`, or destroyed one when it
//! was below `[scaling_policy_in] threshold`, within `min_size..max_size`, assigning new VMs to the
//! load-balancer rule. Both spellings of its sections appear in the seeds: `[scaling…]` and `[scalling…]`.

use std::path::Path;

use crate::providers::cloudstack::credentials::{Ini, parse_ini};

/// The configuration (TOML, commented) and the notes on what changes in meaning.
pub struct Imported {
    pub config: String,
    pub notes: Vec<String>,
}

/// Reads a `.idcfrc` and writes the equivalent group `group`.
pub fn idcfrc(path: &Path, group: &str) -> Result<Imported, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let ini = parse_ini(&text);
    let section = |names: &[&str]| names.iter().find_map(|n| ini.get(*n));
    let mut missing = Vec::new();
    let mut get = |names: &[&str], key: &str| -> String {
        match section(names).and_then(|s| s.get(key)).filter(|v| !v.is_empty()) {
            Some(value) => value.clone(),
            None => {
                missing.push(format!("[{}] {key}", names[0]));
                String::new()
            }
        }
    };
    let host = get(&["account"], "host");
    let zone_id = get(&["launch_config"], "zoneid");
    let template_id = get(&["launch_config"], "templateid");
    let service_offering_id = get(&["launch_config"], "serviceofferingid");
    let min_size = get(&["scaling", "scalling"], "min_size");
    let max_size = get(&["scaling", "scalling"], "max_size");
    let rule_id = get(&["scaling", "scalling"], "load_balancer");
    let out_threshold = get(&["scaling_policy_out", "scalling_policy_out"], "threshold");
    let in_threshold = get(&["scaling_policy_in", "scalling_policy_in"], "threshold");
    get(&["account"], "api_key");
    get(&["account"], "secret_key");
    if !missing.is_empty() {
        return Err(format!(
            "{} lacks what ssh_scale.py needs: {}",
            path.display(),
            missing.join(", ")
        ));
    }
    let number = |key: &str, value: &str| -> Result<f64, String> {
        value
            .parse::<f64>()
            .map_err(|_| format!("{}: {key} = `{value}` is not a number", path.display()))
    };
    let whole = |key: &str, value: &str| -> Result<u32, String> {
        value
            .parse::<u32>()
            .map_err(|_| format!("{}: {key} = `{value}` is not a whole number", path.display()))
    };
    let (min_size, max_size) = (whole("min_size", &min_size)?, whole("max_size", &max_size)?);
    let (out_threshold, in_threshold) = (
        number("[scaling_policy_out] threshold", &out_threshold)?,
        number("[scaling_policy_in] threshold", &in_threshold)?,
    );
    let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let monitored = monitored_vm(&ini);
    let advertise = advertise_url(&host);

    let mut notes = vec![
        format!(
            "ssh_scale.py read one VM's load average over SSH once a minute; ebb reads every member's each second and scales on the group's average over the same minute (load1 avg over 60 s > {out_threshold} → +1, < {in_threshold} → −1)."
        ),
        "cron's one-minute cycle becomes seconds of reaction; cooldown_secs = 60 keeps at most one change a minute, as cron did.".into(),
        "No SSH: [monitoring] user, private_key_path and pass_phrase are not used; the VMs run ebb-agent, which enrols itself from the user data ebb sends with each deploy (bake ebb-agent into the template: docs/baking-templates.md).".into(),
    ];
    if let Some(vm) = &monitored {
        notes.push(format!(
            "The monitored VM `{vm}` is not launched by ebb: to keep it in the group, install ebb-agent on it and enrol it with an operator token, protected from scale-in as ssh_scale.py never destroyed it: `ebb-collector token create --group {group} --uses 1 --protected`."
        ));
    }
    if advertise.is_none() {
        notes.push("Set server.advertise_url to the address the VMs reach this machine at.".into());
    }
    {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
            notes.push(format!(
                "{} holds the secret key and others can read it: run `chmod 600 {}` (the collector refuses it otherwise).",
                path.display(),
                path.display()
            ));
        }
    }

    let advertise_line = match &advertise {
        Some(url) => format!("advertise_url = \"{url}\"   # how the VMs' agents reach this collector"),
        None => "# advertise_url = \"https://THIS-HOST:7300\"   # how the VMs' agents reach this collector".into(),
    };
    let config = format!(
        r#"# Imported from {source} by `ebb-collector import idcfrc`: ssh_scale.py's group, run by ebb.
# Review, save as /etc/ebb/collector.toml, check with `ebb-collector validate`.

[server]
grpc_listen = "0.0.0.0:7300"
{advertise_line}
http_listen = "127.0.0.1:7301"

[[groups]]
name = "{group}"
min_size = {min_size}
max_size = {max_size}
cooldown_secs = 60        # cron ran ssh_scale.py once a minute: at most one change a minute
warmup_secs = 60
max_surge = 1             # ssh_scale.py added one VM per run
member_port = 80

[groups.provider]
type = "cloudstack"
credentials_file = "{credentials}"   # its [account]: host, api_key, secret_key
zone_id = "{zone_id}"
template_id = "{template_id}"
service_offering_id = "{service_offering_id}"

[groups.load_balancer]
type = "cloudstack"
rule_id = "{rule_id}"

# [scaling_policy_out]: load average above {out_threshold} → one more VM.
[[groups.policies]]
name = "load-high"
metric = "load1"
statistic = "avg"
period_secs = 60
comparison = "gt"
threshold = {out_threshold:?}
adjustment = 1

# [scaling_policy_in]: load average below {in_threshold} → one VM fewer (never below min_size).
[[groups.policies]]
name = "load-low"
metric = "load1"
statistic = "avg"
period_secs = 60
comparison = "lt"
threshold = {in_threshold:?}
adjustment = -1
"#,
        source = absolute.display(),
        credentials = absolute.display(),
    );
    Ok(Imported { config, notes })
}

/// `[monitoring] host`, unless it is still the sample's placeholder.
fn monitored_vm(ini: &Ini) -> Option<String> {
    ini.get("monitoring")
        .and_then(|s| s.get("host"))
        .filter(|h| !h.is_empty() && !h.starts_with('['))
        .cloned()
}

/// `https://<this machine's address toward the CloudStack endpoint>:7300`: the address the VMs, on the
/// cloud's network, most likely reach this machine at. No packet is sent (a UDP socket only connects).
fn advertise_url(endpoint: &str) -> Option<String> {
    let host = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .split(['/', ':'])
        .next()?;
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect((host, 443)).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then(|| format!("https://{ip}:7300"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seed 000's `.idcfrc`, with the values its walkthrough chose (zone pascal, min 2, max 4, load 2/1).
    const SEED_000: &str = "[account]
host=http://127.0.0.1:8080/client/api
api_key=AAAA
secret_key=SSSS

[monitoring]
host=scale01
user=root
private_key_path=/root/.ssh/id_rsa
pass_phrase=xxxxxxxx

[launch_config]
serviceofferingid=e01a9f32-55c4-4c0d-9b7c-d49a3ccfd3f6
templateid=7c5ba3d1-7c26-4a66-9c4c-f2a4c0a6e8b1
zoneid=f0954b9b-2626-4549-82ad-ca421073b3bc

[scaling]
min_size=2
max_size=4
load_balancer=3b2d7e6a-5c1f-4e2b-9d3c-1a2b3c4d5e6f

[scaling_policy_out]
threshold=2

[scaling_policy_in]
threshold=1
";

    /// Seed 001's sample, all on its lines as the seed prints it (`[scalling]`, min 2, max 5, load 3/1).
    const SEED_001: &str = "[account]
host=https://127.0.0.1/xxxxx/xxxx/xxx
api_key=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx
secret_key=yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy
[monitoring]
host=i-xxxx-xxxxx-VM
user=root
private_key_path=/root/.ssh/id_rsa
pass_phrase=xxxxxxxx
[launch_config]
serviceofferingid=24
templateid=3525
zoneid=2
[scalling]
min_size=2
max_size=5
load_balancer=xxxxx
[scalling_policy_out]
threshold=3
[scalling_policy_in]
threshold=1
";

    fn import(text: &str) -> Imported {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".idcfrc");
        std::fs::write(&path, text).unwrap();
        idcfrc(&path, "web").unwrap()
    }

    #[test]
    fn both_seed_samples_import_to_a_valid_group() {
        for (text, (min, max), (out, inn), vm) in [
            (SEED_000, (2, 4), (2.0, 1.0), "scale01"),
            (SEED_001, (2, 5), (3.0, 1.0), "i-xxxx-xxxxx-VM"),
        ] {
            let imported = import(text);
            let config = crate::config::parse(Path::new("imported.toml"), &imported.config)
                .unwrap_or_else(|e| panic!("{e}\n{}", imported.config));
            let group = &config.groups[0];
            assert_eq!((group.min_size, group.max_size), (min, max));
            assert_eq!(group.policies.len(), 2);
            assert_eq!(group.policies[0].threshold, Some(out));
            assert_eq!(group.policies[1].threshold, Some(inn));
            assert!(config.warnings().is_empty(), "{:?}", config.warnings());
            let notes = imported.notes.join("\n");
            assert!(
                notes.contains(&format!("monitored VM `{vm}`")) && notes.contains("--protected"),
                "{notes}"
            );
            assert!(
                notes.contains("group's average") && notes.contains("one-minute cycle"),
                "{notes}"
            );
            assert!(notes.contains("chmod 600"), "the test file is world-readable: {notes}");
        }
    }

    #[test]
    fn a_file_without_what_ssh_scale_needs_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".idcfrc");
        std::fs::write(&path, "[account]\nhost=https://x\napi_key=k\nsecret_key=s\n").unwrap();
        let error = idcfrc(&path, "web").err().unwrap();
        assert!(
            error.contains("[launch_config] zoneid") && error.contains("[scaling] min_size"),
            "{error}"
        );
        std::fs::write(&path, SEED_000.replace("min_size=2", "min_size=two")).unwrap();
        assert!(idcfrc(&path, "web").err().unwrap().contains("min_size = `two`"));
    }
}
