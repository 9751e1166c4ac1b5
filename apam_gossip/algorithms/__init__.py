"""Training algorithms: they combine optimizer math, models/data and a transport."""
