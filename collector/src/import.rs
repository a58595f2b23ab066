//! `ebb-collector import`: another tool's autoscaling set-up turned into an ebb configuration for the same
//! group, printed for the operator to review and save; what changes in meaning, or could not be translated,
//! is said separately, for stderr. [`idcfrc`]: an ssh_scale.py `.idcfrc` (seeds 000/001); [`heat`]: a Heat
//! template (seeds 002/003).
//!
//! ssh_scale.py ran from cron each minute, logged in over SSH to one monitored VM, and added one VM from the
//! template when that VM's load average was above `[scaling_policy_out] threshold`, or destroyed one when it
//! was below `[scaling_policy_in] threshold`, within `min_size..max_size`, assigning new VMs to the
//! load-balancer rule. Both spellings of its sections appear in the seeds: `[scaling…]` and `[scalling…]`.

use std::path::Path;

use crate::providers::cloudstack::credentials::{Ini, parse_ini};

/// The configuration (TOML, commented) and the notes on what changes in meaning.
#[derive(Debug)]
pub struct Imported {
    pub config: String,
    pub notes: Vec<String>,
}

/// Reads a `.idcfrc` and writes the equivalent group `group`.
pub fn idcfrc(path: &Path, group: &str) -> Result<Imported, String> {
    let text = crate::config::read_operator_file(path, crate::config::MAX_SMALL_FILE_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    idcfrc_from(&text, path, group)
}

/// [`idcfrc`] of `text`, read from `path`.
pub fn idcfrc_from(text: &str, path: &Path, group: &str) -> Result<Imported, String> {
    let ini = parse_ini(text);
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
    checked(Imported { config, notes })
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

/// `ebb-collector import heat TEMPLATE.yaml`: a Heat template's autoscaling (seeds 002 and 003) as an ebb
/// group. It reads an `OS::Heat::AutoScalingGroup` (or K5's `FCX::AutoScaling::AutoScalingGroup` with its
/// launch configuration and load balancer), its `OS::Heat::ScalingPolicy` (`FCX::AutoScaling::ScalingPolicy`)
/// resources and the `OS::Ceilometer::Alarm` / `OS::Aodh::Alarm` resources that fire them; parameters are
/// resolved from their defaults. What has no ebb meaning is listed in the notes.
pub fn heat(path: &Path, group: &str) -> Result<Imported, String> {
    let text = crate::config::read_operator_file(path, crate::config::MAX_SMALL_FILE_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    heat_from(&text, path, group)
}

/// [`heat`] of `text`, read from `path`.
pub fn heat_from(text: &str, path: &Path, group: &str) -> Result<Imported, String> {
    use serde_yaml::Value;
    let template: Value = serde_yaml::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
    let resources = template
        .get("resources")
        .and_then(Value::as_mapping)
        .ok_or_else(|| format!("{} has no resources", path.display()))?;
    let parameters = template.get("parameters").cloned().unwrap_or(Value::Null);
    let mut notes = Vec::new();
    let resolve = |value: &Value| resolve(value, &parameters);
    // A property as text: literals as they are, `get_param` from the parameter's default, `str_replace`.
    let text_of = |value: Option<&Value>| -> Option<String> {
        match resolve(value?)? {
            Value::String(s) => Some(s.trim_end_matches('%').to_string()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    let number = |value: Option<&Value>| text_of(value).and_then(|t| t.parse::<f64>().ok());
    let of_type = |types: &[&str]| -> Vec<(String, &Value)> {
        resources
            .iter()
            .filter(|(_, r)| {
                r.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| types.contains(&t))
            })
            .map(|(name, r)| {
                (
                    name.as_str().unwrap_or_default().to_string(),
                    r.get("properties").unwrap_or(&Value::Null),
                )
            })
            .collect()
    };
    let groups = of_type(&["OS::Heat::AutoScalingGroup", "FCX::AutoScaling::AutoScalingGroup"]);
    let [(group_resource, properties)] = groups.as_slice() else {
        return Err(format!(
            "{} has {} autoscaling groups (OS::Heat::AutoScalingGroup or FCX::AutoScaling::AutoScalingGroup); import one at a time",
            path.display(),
            groups.len()
        ));
    };
    let k5 = properties.get("MinSize").is_some();
    let get = |heat: &str, k5_name: &str| properties.get(if k5 { k5_name } else { heat });
    let min_size = number(get("min_size", "MinSize")).unwrap_or(1.0) as u32;
    let max_size = number(get("max_size", "MaxSize")).unwrap_or(f64::from(min_size.max(1))) as u32;
    let cooldown = number(get("cooldown", "Cooldown")).unwrap_or(60.0) as u32;
    let desired = number(get("desired_capacity", "DesiredCapacity")).map(|d| d as u32);
    let grace = number(get("", "HealthCheckGracePeriod")).map(|g| g as u32);

    // What a server is made of: Heat's nested resource properties, or K5's launch configuration.
    let server = if k5 {
        let name = properties
            .get("LaunchConfigurationName")
            .and_then(|v| v.get("get_resource"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        resources
            .get(name)
            .and_then(|r| r.get("properties"))
            .cloned()
            .unwrap_or(Value::Null)
    } else {
        properties
            .get("resource")
            .and_then(|r| r.get("properties"))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let field = |heat: &str, k5_name: &str| text_of(server.get(if k5 { k5_name } else { heat }));
    let mut placeholder = |what: &str, key: &str| {
        notes.push(format!(
            "{what} was not given as a literal or a parameter default: set provider.{key}."
        ));
        format!("CHANGE-ME-{key}")
    };
    let image = field("image", "ImageId").unwrap_or_else(|| placeholder("The image", "image"));
    let flavor = field("flavor", "InstanceType").unwrap_or_else(|| placeholder("The flavor", "flavor"));
    let key_name = field("key_name", "KeyName");
    let server_value = |heat: &str, k5_name: &str| server.get(if k5 { k5_name } else { heat }).filter(|v| !v.is_null());
    // Networks: a nested template's `network` parameter, or a server's `networks` list.
    let mut networks: Vec<String> = field("network", "").into_iter().collect();
    if let Some(list) = server_value("networks", "Networks") {
        match resolve(list) {
            Some(Value::Sequence(items)) => {
                for item in &items {
                    let network = match item {
                        Value::Mapping(m) => m.get("network").or(m.get("uuid")),
                        other => Some(other),
                    };
                    match network.and_then(|n| text_of(Some(n))) {
                        Some(network) => networks.push(network),
                        None => notes.push(format!(
                            "A network of the servers ({}) is not a name, an id or a parameter default: add it to provider.networks.",
                            serde_json::to_string(item).unwrap_or_default()
                        )),
                    }
                }
            }
            _ => notes.push("The servers' networks could not be resolved: set provider.networks.".into()),
        }
    }
    let security_groups: Vec<String> = match server_value("security_groups", "SecurityGroups").map(&resolve) {
        Some(Some(Value::Sequence(items))) => items.iter().filter_map(|g| text_of(Some(g))).collect(),
        Some(_) => {
            notes.push("The servers' security groups could not be resolved: set provider.security_groups.".into());
            Vec::new()
        }
        None => Vec::new(),
    };
    let mut metadata = Vec::new();
    if let Some(Value::Mapping(entries)) = server_value("metadata", "Metadata") {
        for (key, value) in entries {
            let key = key.as_str().unwrap_or_default();
            match text_of(Some(value)) {
                Some(value) => metadata.push((key.to_string(), value)),
                None => notes.push(format!(
                    "Server metadata `{key}` comes from Heat ({}), which has no value outside a stack; left out.",
                    serde_json::to_string(value).unwrap_or_default()
                )),
            }
        }
    }
    let user_data = match server_value("user_data", "UserData") {
        None => None,
        Some(value) => match resolve(value) {
            Some(Value::String(text)) => match crate::userdata::OperatorUserData::parse(text.as_bytes()) {
                Ok(_) => Some(text),
                Err(e) => {
                    notes.push(format!(
                        "The servers' user data {e}; left out: fix it and set provider.user_data_file."
                    ));
                    None
                }
            },
            _ => {
                notes.push("The servers' user data uses values only Heat has (get_attr, get_resource, a parameter without a default): left out; set provider.user_data_file.".into());
                None
            }
        },
    };
    let carried = [
        "image",
        "ImageId",
        "flavor",
        "InstanceType",
        "network",
        "networks",
        "key_name",
        "KeyName",
        "user_data",
        "UserData",
        "metadata",
        "security_groups",
        "SecurityGroups",
        "pool_id",
    ];
    if let Value::Mapping(properties) = &server {
        for key in properties
            .keys()
            .filter_map(Value::as_str)
            .filter(|k| !carried.contains(k))
        {
            notes.push(format!(
                "The servers' `{key}` is not carried: ebb's OpenStack provider has no such setting (bake it into the image, or set it in user data)."
            ));
        }
    }

    // K5's load balancer: the instance port and the health check.
    let mut member_port = 80;
    let mut health = Vec::new();
    if k5 {
        let lb = properties
            .get("LoadBalancerNames")
            .and_then(|v| v.get("get_resource"))
            .and_then(Value::as_str)
            .and_then(|name| resources.get(name))
            .and_then(|r| r.get("properties"));
        if let Some(lb) = lb {
            if let Some(port) = lb
                .get("Listeners")
                .and_then(Value::as_sequence)
                .and_then(|l| l.first())
                .and_then(|l| number(l.get("InstancePort")))
            {
                member_port = port as u16;
            }
            if let Some(check) = lb.get("HealthCheck") {
                if let Some(target) = text_of(check.get("Target")) {
                    // "HTTP:81/index.html"
                    if let Some((_, rest)) = target.split_once(':')
                        && let Some((port, path)) = rest.split_once('/')
                    {
                        member_port = port.parse().unwrap_or(member_port);
                        health.push(format!("path = \"/{path}\""));
                    }
                }
                if let Some(timeout) = number(check.get("Timeout")) {
                    health.push(format!("timeout_ms = {}", (timeout * 1000.0) as u32));
                }
                for (k5_key, key) in [
                    ("HealthyThreshold", "healthy_threshold"),
                    ("UnhealthyThreshold", "unhealthy_threshold"),
                ] {
                    if let Some(n) = number(check.get(k5_key)) {
                        health.push(format!("{key} = {}", n as u32));
                    }
                }
                if let Some(interval) = number(check.get("Interval")) {
                    notes.push(format!(
                        "The load balancer checked health every {interval} s; each ebb agent checks with every sample (each second), so the thresholds count seconds, not {interval}-second intervals."
                    ));
                }
            }
        }
    }
    if let Some(grace) = grace {
        health.push(format!("grace_period_secs = {grace}"));
    }

    // Policies: each alarm with the scaling policy its alarm_actions name.
    let policies = of_type(&["OS::Heat::ScalingPolicy", "FCX::AutoScaling::ScalingPolicy"]);
    let alarms = of_type(&["OS::Ceilometer::Alarm", "OS::Aodh::Alarm"]);
    let mut blocks = Vec::new();
    let mut recovery = false;
    // (scales out, policy, cooldown) of each policy an alarm fires.
    let mut cooldowns: Vec<(bool, String, u32)> = Vec::new();
    for (name, alarm) in &alarms {
        let policy_name = alarm
            .get("alarm_actions")
            .and_then(Value::as_sequence)
            .and_then(|a| a.first())
            .and_then(|a| a.get("get_attr"))
            .and_then(Value::as_sequence)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some((_, policy)) = policies.iter().find(|(p, _)| p == policy_name) else {
            notes.push(format!(
                "Alarm {name} triggers no scaling policy of the group; left out."
            ));
            continue;
        };
        let adjustment_type =
            text_of(policy.get("adjustment_type").or(policy.get("AdjustmentType"))).unwrap_or_default();
        let meter = text_of(alarm.get("meter_name").or(alarm.get("metric"))).unwrap_or_default();
        if meter.contains("unhealthy") {
            // K5's recovery: one more server whenever the load balancer finds one unhealthy.
            recovery = true;
            notes.push(format!(
                "Alarm {name} → {policy_name} (recovery on `{meter}`) becomes health_check.replace_unhealthy = true: the unhealthy server is replaced, not added to."
            ));
            continue;
        }
        if !meter.ends_with("cpu_util") && meter != "cpu" {
            notes.push(format!(
                "Alarm {name} watches `{meter}`, which ebb's agents do not measure; left out."
            ));
            continue;
        }
        let adjustment =
            number(policy.get("scaling_adjustment").or(policy.get("ScalingAdjustment"))).unwrap_or(1.0) as i32;
        if let Some(cooldown) = number(policy.get("cooldown").or(policy.get("Cooldown"))) {
            cooldowns.push((adjustment > 0, policy_name.to_string(), cooldown as u32));
        }
        let kind = match adjustment_type.to_ascii_lowercase().replace('_', "").as_str() {
            "exactcapacity" => "exact_capacity",
            "percentchangeincapacity" => "percent_change_in_capacity",
            _ => "change_in_capacity",
        };
        let statistic = match text_of(alarm.get("statistic")).unwrap_or_else(|| "avg".into()).as_str() {
            "max" => "max",
            "min" => "min",
            "sum" => "sum",
            _ => "avg",
        };
        let comparison = text_of(alarm.get("comparison_operator")).unwrap_or_else(|| "gt".into());
        let threshold = number(alarm.get("threshold")).unwrap_or(50.0);
        let period = number(alarm.get("period")).unwrap_or(60.0) as u32;
        let evaluation_periods = number(alarm.get("evaluation_periods")).unwrap_or(1.0) as u32;
        if alarm.get("matching_metadata").is_some() || alarm.get("query").is_some() {
            notes.push(format!(
                "Alarm {name}'s metadata match is not needed: ebb's policies see the group's own members."
            ));
        }
        let (name, policy_name) = (name.escape_debug(), policy_name.escape_debug());
        let toml_name = crate::config::name_from(&name.to_string());
        blocks.push(format!(
            "# From {name} → {policy_name}.\n[[groups.policies]]\nname = \"{toml_name}\"\nmetric = \"cpu\"\nstatistic = \"{statistic}\"\nperiod_secs = {period}\nevaluation_periods = {evaluation_periods}\ncomparison = \"{comparison}\"\nthreshold = {threshold:?}\nadjustment_type = \"{kind}\"\nadjustment = {adjustment}\n"
        ));
    }
    if recovery {
        health.push("replace_unhealthy = true".into());
    }
    for (name, _) in of_type(&[
        "OS::Neutron::LBaaS::Pool",
        "OS::Octavia::Pool",
        "OS::Neutron::Pool",
        "FCX::ExpandableLoadBalancer::LoadBalancer",
    ]) {
        notes.push(format!(
            "The load balancer {name} stays as it is: set load_balancer.pool_id to its Octavia pool's id."
        ));
    }
    notes.push(format!(
        "Ceilometer/Aodh polled every {} and evaluated alarms from there; ebb's agents report every second, so the same alarms act within seconds of the period ending, with no telemetry stack.",
        if k5 { "minute" } else { "10 minutes by default" }
    ));

    let mut config = format!(
        "# Imported from {} by `ebb-collector import heat`: the template's autoscaling group ({group_resource}), run by ebb.\n# Review, save as /etc/ebb/collector.toml, check with `ebb-collector validate`.\n\n[server]\ngrpc_listen = \"0.0.0.0:7300\"\n# advertise_url = \"https://THIS-HOST:7300\"   # how the servers' agents reach this collector\nhttp_listen = \"127.0.0.1:7301\"\n\n[[groups]]\nname = \"{group}\"\nmin_size = {min_size}\nmax_size = {max_size}\n",
        path.display()
    );
    if let Some(desired) = desired {
        config.push_str(&format!("desired_capacity = {desired}\n"));
    }
    config.push_str(&format!("cooldown_secs = {cooldown}\n"));
    for (out, key) in [(true, "scale_out_cooldown_secs"), (false, "scale_in_cooldown_secs")] {
        let mine: Vec<&(bool, String, u32)> = cooldowns.iter().filter(|c| c.0 == out).collect();
        let Some(longest) = mine.iter().map(|c| c.2).max() else {
            continue;
        };
        if mine.iter().any(|c| c.2 != longest) {
            let each: Vec<String> = mine.iter().map(|c| format!("{} {} s", c.1, c.2)).collect();
            notes.push(format!(
                "The policies that scale {} have different cooldowns ({}); ebb has one per direction: {key} = {longest}.",
                if out { "out" } else { "in" },
                each.join(", ")
            ));
        }
        if longest != cooldown {
            config.push_str(&format!("{key} = {longest}   # the policies' own cooldown\n"));
        }
    }
    config.push_str(&format!("member_port = {member_port}\n"));
    if !health.is_empty() {
        config.push_str(&format!("\n[groups.health_check]\n{}\n", health.join("\n")));
    }
    config.push_str(&format!(
        "\n[groups.provider]\ntype = \"openstack\"   # credentials: clouds.yaml (OS_CLOUD) or the OS_* variables\nimage = \"{image}\"\nflavor = \"{flavor}\"\n"
    ));
    let quoted = |text: &str| toml::Value::String(text.to_string()).to_string();
    let list = |items: &[String]| items.iter().map(|i| quoted(i)).collect::<Vec<_>>().join(", ");
    if !networks.is_empty() {
        config.push_str(&format!("networks = [{}]\n", list(&networks)));
    }
    if let Some(key) = key_name {
        config.push_str(&format!("key_name = {}\n", quoted(&key)));
    }
    if !security_groups.is_empty() {
        config.push_str(&format!("security_groups = [{}]\n", list(&security_groups)));
    }
    if !metadata.is_empty() {
        let entries: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{} = {}", quoted(k), quoted(v)))
            .collect();
        config.push_str(&format!("metadata = {{ {} }}\n", entries.join(", ")));
    }
    if let Some(user_data) = user_data {
        config.push_str(&format!(
            "# The servers' user data, sent beside ebb's enrolment.\nuser_data = {}\n",
            quoted(&user_data)
        ));
    }
    config.push_str("\n[groups.load_balancer]\ntype = \"octavia\"\npool_id = \"CHANGE-ME-pool-id\"   # the Octavia pool the servers join\n");
    for block in blocks {
        config.push('\n');
        config.push_str(&block);
    }
    checked(Imported { config, notes })
}

/// The import, if `validate` would take it; else why not, so `import` never writes a config `serve` refuses.
fn checked(imported: Imported) -> Result<Imported, String> {
    match crate::config::parse(Path::new("(imported)"), &imported.config) {
        Ok(_) => Ok(imported),
        Err(e) => Err(format!(
            "the imported configuration would not be valid, so none was written: {}",
            e.to_string().trim_start_matches("(imported): ")
        )),
    }
}

/// A Heat value with what can be known outside a stack resolved: `get_param` from the parameter's
/// default, `str_replace` of a template with such params. `None` when it depends on the stack (`get_attr`,
/// `get_resource`, `OS::stack_id`, a parameter without a default).
fn resolve(value: &serde_yaml::Value, parameters: &serde_yaml::Value) -> Option<serde_yaml::Value> {
    use serde_yaml::Value;
    let Value::Mapping(m) = value else {
        return Some(value.clone());
    };
    if let Some(name) = m.get("get_param") {
        return parameters.get(name.as_str()?)?.get("default").cloned();
    }
    if let Some(replace) = m.get("str_replace") {
        let mut text = resolve(replace.get("template")?, parameters)?.as_str()?.to_string();
        if let Some(Value::Mapping(params)) = replace.get("params") {
            for (key, value) in params {
                let with = match resolve(value, parameters)? {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                text = text.replace(key.as_str()?, &with);
            }
        }
        return Some(Value::String(text));
    }
    if m.keys().any(|k| {
        k.as_str()
            .is_some_and(|k| k.starts_with("get_") || k.starts_with("Fn::"))
    }) {
        return None;
    }
    let mut resolved = serde_yaml::Mapping::new();
    for (key, value) in m {
        resolved.insert(key.clone(), resolve(value, parameters)?);
    }
    Some(Value::Mapping(resolved))
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
    fn an_idcfrc_with_min_above_max_writes_no_config() {
        let text = SEED_000.replace("max_size=4", "max_size=1");
        let error = idcfrc_from(&text, Path::new("/root/.idcfrc"), "web").unwrap_err();
        assert!(error.contains("min_size: 2 is greater than max_size 1"), "{error}");
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

    fn heat_fixture(name: &str) -> Imported {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/heat")
            .join(name);
        heat(&path, "web").unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn valid(imported: &Imported) -> crate::config::CollectorConfig {
        crate::config::parse(Path::new("imported.toml"), &imported.config)
            .unwrap_or_else(|e| panic!("{e}\n{}", imported.config))
    }

    #[test]
    fn a_template_of_parameters_str_replace_and_per_policy_cooldowns_round_trips() {
        let imported = heat_fixture("params-and-cooldowns.yaml");
        let config = valid(&imported);
        let group = &config.groups[0];
        assert_eq!((group.min_size, group.max_size, group.cooldown_secs), (2, 6, 90));
        assert_eq!(
            (group.scale_out_cooldown_secs, group.scale_in_cooldown_secs),
            (Some(120), Some(300)),
            "each direction keeps its policy's cooldown: {}",
            imported.config
        );
        let crate::config::ProviderConfig::Openstack(provider) = &group.provider else {
            panic!("{}", imported.config);
        };
        assert_eq!(
            (provider.image.as_str(), provider.flavor.as_str()),
            ("ubuntu-22.04", "m1.medium")
        );
        assert_eq!(provider.key_name.as_deref(), Some("ops-key"));
        assert_eq!(provider.security_groups, ["base", "web"]);
        assert_eq!(
            provider
                .metadata
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
            [("role", "web"), ("tier", "frontend")]
        );
        assert_eq!(
            provider.user_data.as_deref(),
            Some("#!/bin/sh\necho \"serving web on 8080\" > /etc/motd\nsystemctl start app@8080\n"),
            "str_replace with the parameters' defaults"
        );
        assert!(group.operator_user_data.is_some());
        let thresholds: Vec<_> = group
            .policies
            .iter()
            .map(|p| (p.threshold, p.adjustment, p.period_secs))
            .collect();
        assert_eq!(thresholds, [(Some(70.0), Some(2), 120), (Some(20.0), Some(-1), 300)]);

        // Each thing not carried has its note.
        let notes = imported.notes.join("\n");
        for expected in [
            "Server metadata `stack` comes from Heat",
            "A network of the servers ({\"port\":{\"get_resource\":\"port\"}})",
            "The servers' `scheduler_hints` is not carried",
            "The servers' `user_data_format` is not carried",
        ] {
            assert!(notes.contains(expected), "{expected}: {notes}");
        }
        // `get_param: [nets, 0]` (a list element) is not resolved: said, not dropped.
        assert!(
            notes.contains("A network of the servers ({\"network\":{\"get_param\":[\"nets\",0]}})"),
            "{notes}"
        );
        assert_eq!(provider.networks, ["back-net"]);
    }

    #[test]
    fn differing_cooldowns_in_one_direction_and_unresolved_security_groups_are_notes() {
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/heat/params-and-cooldowns.yaml"),
        )
        .unwrap();
        // A second scale-out policy with its own cooldown, fired by its own alarm.
        let two_out = template.replace(
            "  in_policy:",
            "  burst_policy:\n    type: OS::Heat::ScalingPolicy\n    properties:\n      adjustment_type: change_in_capacity\n      \
             auto_scaling_group_id: {get_resource: tier}\n      cooldown: 600\n      scaling_adjustment: 4\n  \
             cpu_burst:\n    type: OS::Aodh::Alarm\n    properties:\n      meter_name: cpu_util\n      period: 60\n      \
             threshold: 95\n      comparison_operator: gt\n      alarm_actions:\n        - {get_attr: [burst_policy, alarm_url]}\n  \
             in_policy:",
        );
        let imported = heat_from(&two_out, Path::new("t.yaml"), "web").unwrap();
        let group = &valid(&imported).groups[0];
        assert_eq!(
            group.scale_out_cooldown_secs,
            Some(600),
            "the longest: {}",
            imported.config
        );
        let notes = imported.notes.join("\n");
        assert!(
            notes.contains(
                "The policies that scale out have different cooldowns (burst_policy 600 s, out_policy 120 s)"
            ),
            "{notes}"
        );

        let unresolved = template.replace(
            "security_groups: [base, {get_param: role}]",
            "security_groups: {get_attr: [sg, name]}",
        );
        let imported = heat_from(&unresolved, Path::new("t.yaml"), "web").unwrap();
        assert!(
            imported
                .notes
                .join("\n")
                .contains("security groups could not be resolved: set provider.security_groups"),
            "{:?}",
            imported.notes
        );
    }

    #[test]
    fn user_data_that_cannot_be_resolved_or_run_is_a_note_and_a_broken_group_no_config() {
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/heat/params-and-cooldowns.yaml"),
        )
        .unwrap();
        let secret = template.replace("$ROLE: {get_param: role}", "$ROLE: {get_param: secret}");
        let imported = heat_from(&secret, Path::new("t.yaml"), "web").unwrap();
        assert!(!imported.config.contains("user_data = "), "{}", imported.config);
        assert!(
            imported
                .notes
                .join("\n")
                .contains("user data uses values only Heat has"),
            "{:?}",
            imported.notes
        );

        let plain = template.replace("#!/bin/sh", "set -e");
        let imported = heat_from(&plain, Path::new("t.yaml"), "web").unwrap();
        assert!(
            imported.notes.join("\n").contains("which cloud-init ignores"),
            "{:?}",
            imported.notes
        );

        let broken = template.replace("max_size: 6", "max_size: 1");
        let error = heat_from(&broken, Path::new("t.yaml"), "web").unwrap_err();
        assert!(
            error.contains("would not be valid, so none was written")
                && error.contains("min_size: 2 is greater than max_size 1"),
            "{error}"
        );
    }

    #[test]
    fn the_red_hat_examples_import_to_valid_groups() {
        let example = heat_fixture("rhosp-example.yaml");
        let config = valid(&example);
        let group = &config.groups[0];
        assert_eq!((group.min_size, group.max_size), (1, 3));
        let thresholds: Vec<_> = group
            .policies
            .iter()
            .map(|p| (p.name.clone(), p.threshold, p.adjustment))
            .collect();
        assert_eq!(
            thresholds,
            [
                ("cpu_alarm_high".to_string(), Some(50.0), Some(1)),
                ("cpu_alarm_low".to_string(), Some(10.0), Some(-1))
            ]
        );
        let notes = example.notes.join("\n");
        assert!(
            notes.contains("set provider.image"),
            "a nested template's server is not in this file: {notes}"
        );

        let lb = heat_fixture("rhosp-lb-webserver.yaml");
        let config = valid(&lb);
        let group = &config.groups[0];
        assert_eq!((group.min_size, group.max_size), (1, 3));
        assert!(
            lb.config.contains("image = \"RHEL 7\"") && lb.config.contains("flavor = \"m2.tiny\""),
            "{}",
            lb.config
        );
        assert!(lb.config.contains("networks = [\"private\"]"), "{}", lb.config);
        assert_eq!(group.policies[0].threshold, Some(95.0));
        assert_eq!(group.policies[1].threshold, Some(15.0));
        let notes = lb.notes.join("\n");
        assert!(
            notes.contains("The load balancer pool stays") && notes.contains("metadata match is not needed"),
            "{notes}"
        );
    }

    #[test]
    fn the_k5_template_imports_with_its_health_check_and_recovery() {
        let k5 = heat_fixture("k5-web-server-group.yaml");
        let config = valid(&k5);
        let group = &config.groups[0];
        assert_eq!((group.min_size, group.max_size), (2, 6));
        assert_eq!(group.member_port, 81);
        let health = &group.health_check;
        assert_eq!(health.path, "/index.html");
        assert_eq!((health.healthy_threshold, health.unhealthy_threshold), (3, 3));
        assert_eq!((health.timeout_ms, health.grace_period_secs), (5000, 120));
        assert!(health.replace_unhealthy, "the recovery policy");
        let crate::config::ProviderConfig::Openstack(provider) = &group.provider else {
            panic!("{}", k5.config);
        };
        assert_eq!(
            provider.user_data.as_deref(),
            Some("#!/bin/bash\nyum -y install httpd\n"),
            "K5's UserData"
        );
        assert_eq!(provider.security_groups, ["SG_Web"]);
        assert!(
            k5.notes.join("\n").contains("`BlockDeviceMappingsV2` is not carried"),
            "{:?}",
            k5.notes
        );
        assert_eq!(
            group.policies.len(),
            2,
            "scale-out and scale-in; recovery is health replacement"
        );
        assert_eq!(group.policies[0].threshold, Some(50.0), "`50%` read as 50");
        assert!(
            k5.config.contains("flavor = \"S-1\"") && k5.config.contains("cooldown_secs = 750"),
            "{}",
            k5.config
        );
        let notes = k5.notes.join("\n");
        assert!(
            notes.contains("recovery on `fcx.loadbalancing.instance.unhealthy`"),
            "{notes}"
        );
        assert!(notes.contains("every 10 s"), "{notes}");
    }
}
