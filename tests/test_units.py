from hwnas.search.units import display_metrics, format_ms


def test_latency_reads_in_microseconds_below_a_millisecond():
    assert format_ms(0.01074) == "10.7 µs"
    assert format_ms(0.5124) == "512 µs"
    assert format_ms(3.2149) == "3.21 ms"
    assert format_ms(1250.4) == "1250 ms"
    assert format_ms(None) == "-"
    assert format_ms(float("nan")) == "-"


def test_step_times_are_named_as_times():
    out = display_metrics({"val_accuracy": 0.9, "train_s": 1.5, "total_s": 3.0, "latency_ms": 0.02, "time/x_s": 1})
    assert out == {"val_accuracy": 0.9, "time/train_s": 1.5, "time/total_s": 3.0, "latency_ms": 0.02, "time/x_s": 1}
