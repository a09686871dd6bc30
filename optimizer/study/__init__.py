"""The study service: study files, the trial record, the run loop and its workers, storage."""
