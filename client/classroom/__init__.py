"""From a classroom camera to a lesson report, inside the school: face detection and alignment
(`faces`), per-student tracks (`tracks`), frame sources (`sources`), the school-folder writer
(`ingest`), the seed-001 learning-status indicators (`indicators`) and the teacher's report (`report`).
Nothing here opens a network connection."""
