"""The continual scenarios: the coordinator, a party's stage, their messages, in-process parties."""
