"""People's (and AI judges') judgements of model outputs: how far the labellers agree with each other
(agreement.py) and the ratings of the models their pairwise votes imply (ratings.py). Plain functions over plain
data, with no web app, database or model behind them, so the labelling app and the judge evaluation share them."""
