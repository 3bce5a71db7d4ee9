"""What both scenario kinds share: settings, scenario files, run folders, results, wire checks, CLI flags."""
