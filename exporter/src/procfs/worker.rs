//! A thread that answers questions about processes from `/proc`, so that
//! the thread asking never waits for a scan whose size other processes
//! decide. Questions wait in a bounded queue (past it one is refused and
//! the asker decides what that costs); answers are taken when ready.

use std::{
    io,
    sync::mpsc::{self, Receiver, SyncSender, TrySendError},
    thread,
};

use tracing::warn;

pub struct ScanWorker<Question, Answer> {
    questions: SyncSender<Question>,
    answers: Receiver<Answer>,
    name: &'static str,
}

impl<Question: Send + 'static, Answer: Send + 'static> ScanWorker<Question, Answer> {
    /// Starts the thread `name`, answering each question with `answer`;
    /// at most `queue` questions wait.
    pub fn start(
        name: &'static str,
        queue: usize,
        answer: impl Fn(Question) -> Answer + Send + 'static,
    ) -> io::Result<Self> {
        let (questions, asked) = mpsc::sync_channel::<Question>(queue);
        let (answered, answers) = mpsc::channel();
        thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                for question in asked {
                    if answered.send(answer(question)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(ScanWorker {
            questions,
            answers,
            name,
        })
    }

    /// Queues a question; `false` when the queue is full or the thread is
    /// gone.
    pub fn ask(&self, question: Question) -> bool {
        match self.questions.try_send(question) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => false,
            Err(TrySendError::Disconnected(_)) => {
                warn!(thread = self.name, "a /proc scanning thread is gone");
                false
            }
        }
    }

    /// The answers ready now, in the order asked.
    pub fn answers(&self) -> impl Iterator<Item = Answer> + '_ {
        self.answers.try_iter()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Barrier},
        time::{Duration, Instant},
    };

    use super::*;

    #[test]
    fn questions_are_answered_in_order_within_the_queue() {
        let started = Arc::new(Barrier::new(2));
        let release = Arc::new(Barrier::new(2));
        let (worker_started, worker_release) = (started.clone(), release.clone());
        let worker = ScanWorker::start("test-scan", 2, move |n: u32| {
            if n == 0 {
                worker_started.wait();
                worker_release.wait();
            }
            n * 10
        })
        .expect("thread");
        assert!(worker.ask(0));
        started.wait();
        // The thread is busy with 0: two questions wait, a third is refused.
        assert!(worker.ask(1));
        assert!(worker.ask(2));
        assert!(!worker.ask(3));
        release.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut answers = Vec::new();
        while answers.len() < 3 && Instant::now() < deadline {
            answers.extend(worker.answers());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(answers, vec![0, 10, 20]);
    }
}
