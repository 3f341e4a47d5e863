//! The trace contract on the captured runs: the facts, contexts and attributes the webhook reads
//! off each attempt's pod at admission are the ones read off the finished TaskRun object, so
//! the exporter derives the ids the webhook injected.

use std::collections::BTreeMap;
use std::path::Path;

use lightstep_tekton_webhook::admission::pod::PodView;
use lightstep_tekton_webhook::contract::attempt_context;
use lightstep_tekton_webhook::contract::attributes::task_run_attributes;
use lightstep_tekton_webhook::contract::tekton::TaskRunFacts;
use serde_json::Value;

type Map = BTreeMap<String, String>;

/// One TaskRun attempt as the object tells it.
struct Attempt {
    name: String,
    uid: String,
    labels: Option<Map>,
    annotations: Option<Map>,
    attempt: u32,
}

fn runs_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/runs")
}

fn map(v: &Value) -> Option<Map> {
    serde_json::from_value(v.clone()).ok()
}

/// Every TaskRun attempt of every captured run, by its pod's name.
fn attempts() -> BTreeMap<String, Attempt> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(runs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let list: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for item in list["items"].as_array().unwrap() {
            if item["kind"] != "TaskRun" {
                continue;
            }
            let meta = &item["metadata"];
            let name = meta["name"].as_str().unwrap().to_owned();
            let uid = meta["uid"].as_str().unwrap().to_owned();
            let (labels, annotations) = (map(&meta["labels"]), map(&meta["annotations"]));
            let retries = item["status"]["retriesStatus"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut pods: Vec<(&Value, u32)> = retries
                .iter()
                .enumerate()
                .map(|(i, r)| (&r["podName"], i as u32))
                .collect();
            pods.push((&item["status"]["podName"], retries.len() as u32));
            for (pod, attempt) in pods {
                if let Some(pod) = pod.as_str().filter(|p| !p.is_empty()) {
                    let row = Attempt {
                        name: name.clone(),
                        uid: uid.clone(),
                        labels: labels.clone(),
                        annotations: annotations.clone(),
                        attempt,
                    };
                    out.insert(pod.to_owned(), row);
                }
            }
        }
    }
    out
}

#[test]
fn every_pod_and_its_task_run_attempt_agree_on_facts_context_and_attributes() {
    let attempts = attempts();
    let mut compared = 0;
    for entry in std::fs::read_dir(runs_dir().join("reviews")).unwrap() {
        let review: Value =
            serde_json::from_slice(&std::fs::read(entry.unwrap().path()).unwrap()).unwrap();
        let pod: PodView = serde_json::from_value(review["request"]["object"].clone()).unwrap();
        let pod_name = pod.metadata.name.clone().unwrap();
        let namespace = review["request"]["namespace"].as_str().unwrap();
        let run = attempts
            .get(&pod_name)
            .unwrap_or_else(|| panic!("no TaskRun attempt ran pod {pod_name}"));
        let from_pod = pod.facts().expect("a TaskRun pod");
        let from_run = TaskRunFacts::from_task_run(
            &run.name,
            Some(&run.uid),
            run.labels.as_ref(),
            run.annotations.as_ref(),
            run.attempt,
        );
        assert_eq!(from_pod, from_run, "{pod_name}");
        assert_eq!(
            attempt_context(&from_pod, 0.5),
            attempt_context(&from_run, 0.5)
        );
        assert_eq!(
            task_run_attributes(&from_pod, namespace, Some(&pod_name)),
            task_run_attributes(&from_run, namespace, Some(&pod_name)),
        );
        compared += 1;
    }
    // 24 pods, two of them the attempts of one retried TaskRun.
    assert_eq!(compared, 24);
}
