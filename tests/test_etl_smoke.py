"""The shared fixtures produce a loadable ETL directory."""

from merlin_ncf.feature_spec import FeatureSpec


def test_etl_dir_is_a_feature_spec_directory(etl_dir):
    spec = FeatureSpec.load(etl_dir)
    assert spec.has_mapping("validation")
    assert spec.test_samples_per_series == 101
    assert all(p.is_file() for p in spec.files("train") + spec.files("test"))
