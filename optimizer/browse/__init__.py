"""Looking at a study: the front, terminal views, the live run display, the HTML report,
optuna-dashboard, and chatting with a trial."""
