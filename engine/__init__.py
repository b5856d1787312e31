"""One replica's inference: model runner over the paged cache, scheduler, sampling, protocols."""
