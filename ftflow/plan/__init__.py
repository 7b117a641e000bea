"""Planning before anything loads: memory predictions, the decisions made from them, how a training run fits, the budget, the disk and every run a config implies; tables and plots apart."""
