"""The networks and their losses: architecture and maths only."""
