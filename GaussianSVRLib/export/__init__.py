"""What a run hands back: the output frame, previews and final outputs, the JSON report, the QC
picture and montages."""
