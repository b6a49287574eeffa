"""Side-by-side benchmarks of lorakit and PEFT (run with ``make bench``)."""
