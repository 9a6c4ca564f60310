//! Operator requests (`remus-wan switchover`, `remus-wan verify`) reach a
//! site daemon on its one metrics port; each names its VM and goes to the
//! engine that runs that VM here, if any.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::metrics::{ControlRequest, ControlSlot};

/// The VMs that take control requests in this process, by name.
#[derive(Clone, Default)]
pub struct ControlRouter {
    vms: Arc<Mutex<HashMap<String, mpsc::Sender<ControlRequest>>>>,
}

impl ControlRouter {
    /// The slot for the metrics server: requests put there are routed by
    /// their VM name (a task of the current runtime does it).
    pub fn slot(&self) -> ControlSlot {
        let (tx, mut rx) = mpsc::channel::<ControlRequest>(16);
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                me.route(req).await;
            }
        });
        Arc::new(Mutex::new(Some(tx)))
    }

    /// Requests for `vm` go to `tx` from now on.
    pub fn register(&self, vm: &str, tx: mpsc::Sender<ControlRequest>) {
        self.lock().insert(vm.to_owned(), tx);
    }

    /// `vm` takes no requests any more (not running here).
    pub fn unregister(&self, vm: &str) {
        self.lock().remove(vm);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<ControlRequest>>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn route(&self, req: ControlRequest) {
        let vm = match &req {
            ControlRequest::Switchover { vm, .. } | ControlRequest::Verify { vm, .. } => vm.clone(),
        };
        let target = self.lock().get(&vm).cloned();
        let refused = match target {
            Some(tx) => match tx.send(req).await {
                Ok(()) => return,
                Err(e) => (e.0, format!("VM {vm} is stopping in this process")),
            },
            None => (
                req,
                format!("VM {vm} does not run in this process (it serves none by that name, or only holds its replica)"),
            ),
        };
        reply_err(refused.0, refused.1);
    }
}

fn reply_err(req: ControlRequest, why: String) {
    match req {
        ControlRequest::Switchover { reply, .. } | ControlRequest::Verify { reply, .. } => {
            let _ = reply.send(Err(why));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switchover(
        vm: &str,
    ) -> (
        ControlRequest,
        tokio::sync::oneshot::Receiver<Result<String, String>>,
    ) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        (
            ControlRequest::Switchover {
                vm: vm.into(),
                reply,
            },
            rx,
        )
    }

    #[tokio::test]
    async fn requests_reach_their_vm_and_unknown_vms_are_refused() {
        let router = ControlRouter::default();
        let slot = router.slot();
        let tx = slot.lock().unwrap().clone().unwrap();
        let (web_tx, mut web_rx) = mpsc::channel(1);
        router.register("web1", web_tx);

        let (req, _rx) = switchover("web1");
        tx.send(req).await.unwrap();
        match web_rx.recv().await {
            Some(ControlRequest::Switchover { vm, .. }) => assert_eq!(vm, "web1"),
            other => panic!("web1 got {other:?}"),
        }

        let (req, rx) = switchover("db1");
        tx.send(req).await.unwrap();
        let answer = rx.await.unwrap();
        assert!(answer.unwrap_err().contains("db1 does not run"));

        router.unregister("web1");
        let (req, rx) = switchover("web1");
        tx.send(req).await.unwrap();
        assert!(rx.await.unwrap().is_err());
    }
}
