"""Cohorts: every subject (and session) of a BIDS dataset reconstructed into BIDS derivatives, on Dask
from one laptop to a cluster, with a QC table and page over the cohort."""
